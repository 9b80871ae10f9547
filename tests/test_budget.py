"""Budgets (max_calls, max_prompt_tokens, max_output_tokens, max_cost_usd): checked before a
step sends anything and while it runs; exceeding one stops cleanly and keeps the work done."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import llmsql
from llmsql.budget import Budget, Price, Settings, apply_setting
from llmsql.errors import BudgetExceeded, ConfigError
from tests.answers import RuleBackend
from tests.llm_servers import client_options, shared_server


@pytest.fixture
def words() -> pd.DataFrame:
    return pd.DataFrame({"w": [f"word{i}" for i in range(10)], "v": [f"v{i}" for i in range(10)]})


def test_a_step_that_cannot_fit_sends_nothing(words: pd.DataFrame, tmp_path: Path) -> None:
    rule = RuleBackend()
    with llmsql.connect(backend=rule, cache=tmp_path / "c.sqlite", progress=False) as con:
        con.register("t", words)
        con.sql("SET llmsql.max_calls = 3")
        with pytest.raises(BudgetExceeded, match="llmsql.max_calls = 3") as info:
            con.sql("SELECT LLM('Say', w) FROM t")
    assert rule.prompts == []
    assert info.value.budget == "max_calls" and info.value.used == 0
    assert "nothing of it was sent" in str(info.value)


def test_budget_stops_between_steps_and_a_rerun_continues(words: pd.DataFrame,
                                                          tmp_path: Path) -> None:
    sql = "SELECT LLM('Say', w) AS a, LLM('Echo', v) AS b FROM t"
    rule = RuleBackend()
    with llmsql.connect(backend=rule, cache=tmp_path / "c.sqlite", progress=False,
                        budget={"max_calls": 15}) as con:
        con.register("t", words)
        with pytest.raises(BudgetExceeded, match="used so far") as info:
            con.sql(sql)
        assert len(rule.prompts) == 10 and info.value.used == 10  # the first call finished
        con.set("max_calls", 10)
        res = con.sql(sql)  # the first call comes from the cache, for free
    assert [c.from_cache for c in res.stats.calls] == [10, 0]
    assert [c.sent for c in res.stats.calls] == [0, 10]


def test_settings_are_validated() -> None:
    assert apply_setting(Settings(), "max_cost_usd", "2.5").budget.max_cost_usd == 2.5
    assert apply_setting(Settings(), "max_calls", None).budget == Budget()
    for name, value in (("max_calls", -1), ("max_calls", "many"), ("on_error", "ignore"),
                        ("cache", "sometimes"), ("max_tokens", 3)):
        with pytest.raises(ConfigError, match=name):
            apply_setting(Settings(), name, value)
    with pytest.raises(ConfigError, match="price of model"):
        Price.parse("m", "cheap")
    with llmsql.connect(dry_run=True, progress=False) as con:
        con.sql("SET llmsql.max_calls = 5; SET llmsql.on_error = fail")
        assert con.settings.budget.max_calls == 5 and con.settings.on_error == "fail"
        con.sql("SET llmsql.max_calls = NULL")
        assert con.settings.budget.max_calls is None


@pytest.mark.model
def test_token_and_cost_budgets_are_never_overshot(tmp_path: Path) -> None:
    server = shared_server()
    df = pd.DataFrame({"w": ["sun", "moon", "star", "tree", "rock", "lake"]})
    sql = "SELECT w, LLM('Write one word about this.', w, max_tokens => 4) AS a FROM t"
    opts = client_options(server, cache=tmp_path / "c.sqlite", concurrency=4,
                          prices={"smollm2": (1000.0, 5000.0)})
    with llmsql.connect(**opts) as con:
        con.register("t", df)
        con.sql("SET llmsql.max_output_tokens = 10")
        with pytest.raises(BudgetExceeded, match="max_output_tokens") as out:
            con.sql(sql)
        assert 0 < out.value.used <= 10
        con.sql("SET llmsql.max_output_tokens = NULL; SET llmsql.max_cost_usd = 0.2")
        with pytest.raises(BudgetExceeded, match="max_cost_usd") as cost:
            con.sql(sql)
        assert 0 < cost.value.used <= 0.2
        con.sql("SET llmsql.max_cost_usd = NULL; SET llmsql.max_prompt_tokens = 1000")
        res = con.sql(sql)  # what the stopped runs paid for comes from the cache
    call = res.stats.calls[0]
    assert call.from_cache >= 2 and call.from_cache + call.sent == len(df)
    assert call.prompt_tokens <= 1000


def test_cost_budget_needs_a_price(words: pd.DataFrame) -> None:
    with llmsql.connect(backend=RuleBackend(), cache=False, progress=False,
                        budget=Budget(max_cost_usd=1.0)) as con:
        con.register("t", words)
        with pytest.raises(ConfigError, match="prices="):
            con.sql("SELECT LLM('Say', w) FROM t")


def test_shares_split_what_is_left_in_proportion_and_add_up() -> None:
    from llmsql.budget import BudgetMeter, PartSize, Usage

    meter = BudgetMeter(Budget(max_calls=10, max_prompt_tokens=1000, max_cost_usd=1.0),
                        lambda _model: Price(1000.0, 0.0))
    meter.charge(Usage(calls=3, prompt_tokens=100, cost_usd=0.1))
    sizes = [PartSize(4, 100), PartSize(0, 0), PartSize(2, 300), PartSize(1, 500)]
    shares = meter.shares(sizes, None)
    assert [s.max_calls for s in shares] == [4, 0, 2, 1]  # 7 left, by prompts
    assert [s.max_prompt_tokens for s in shares] == [100, 0, 300, 500]  # 900 left, by tokens
    assert sum(s.max_cost_usd or 0 for s in shares) == pytest.approx(0.9)
    assert shares[3].max_cost_usd == pytest.approx(0.5)  # by the priced prompt tokens
    assert all(s.max_output_tokens is None for s in shares)  # unlimited stays unlimited
    tight = BudgetMeter(Budget(max_calls=2), lambda _model: None)
    assert [s.max_calls for s in tight.shares([PartSize(1, 9)] * 3, None)] == [1, 1, 0]
