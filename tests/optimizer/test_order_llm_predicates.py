"""order_llm_predicates: sampled selectivity decides the chain order; results never change."""

from __future__ import annotations

import pandas as pd
import pytest

import llmsql
from llmsql.optimizer.order_llm_predicates import PredicateEstimate, estimate, rank
from tests.answers import RuleBackend

SQL = ("SELECT id FROM t WHERE LLM_FILTER('Good?', review) AND LLM_FILTER('Good?', genre) "
       "ORDER BY id")


@pytest.fixture
def table() -> pd.DataFrame:
    # 'Good?' answers Yes iff a value contains 'Great': 1 review in 4 passes, no genre passes
    return pd.DataFrame({
        "id": range(400),
        "review": [("Great " if i % 4 == 0 else "Meh ") + str(i % 200) for i in range(400)],
        "genre": ["crime" if i % 2 else "drama" for i in range(400)],
    })


def run(table: pd.DataFrame, optimize: bool) -> tuple[list[int], RuleBackend]:
    rule = RuleBackend()
    with llmsql.connect(backend=rule, progress=False, optimize=optimize) as con:
        con.register("t", table)
        ids = con.sql(SQL).df()["id"].tolist()
    return ids, rule


def test_selective_cheap_filter_runs_first_and_saves_prompts(table: pd.DataFrame) -> None:
    ids_opt, opt = run(table, optimize=True)
    ids_plain, plain = run(table, optimize=False)
    assert ids_opt == ids_plain == []
    # written order sends all 200 distinct reviews; ordered, the genre filter (drops all)
    # runs first and the review filter only pays for its 32-row sample
    assert len(plain.prompts) == 200 + 1  # passing rows all have genre drama
    assert len(opt.prompts) <= 2 + 32
    assert len(opt.prompts) == len(set(opt.prompts))  # nothing paid twice


def test_rank_orders_by_cost_over_drop_rate() -> None:
    cheap_keeps_all = PredicateEstimate((0, 0), 1.0, 1.0)
    dear_drops_most = PredicateEstimate((0, 1), 0.1, 100.0)
    cheap_drops_half = PredicateEstimate((0, 2), 0.5, 10.0)
    order = rank([cheap_keeps_all, dear_drops_most, cheap_drops_half])
    assert sorted(order, key=order.__getitem__) == [(0, 2), (0, 1), (0, 0)]


def test_estimate_from_sample_counts() -> None:
    e = estimate((0, 1), rows=32, distinct=16, true=4, prompt_tokens=1600, answered=16)
    assert e.selectivity == 0.25
    assert e.tokens_per_row == 50.0
