"""The expert_order rule: a no-op without expert offload or a routing table (saying why when
offload is on), rows reordered only within prefix groups when a table predicts their experts,
and a real query over a tiny MoE model answering the same with the rule on."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from llmsql.backends.base import Capabilities
from llmsql.moe.affinity import ExpertRouting, RoutingTable
from llmsql.moe.plan import MoEShape
from llmsql.optimizer import RULES, RuleContext, optimize
from llmsql.optimizer._doctest import batch_of
from llmsql.optimizer.dedup_prompts import dedup_prompts
from llmsql.optimizer.expert_order import expert_order, flat_groups
from llmsql.optimizer.reorder_prompts import reorder_prompts
from llmsql.plan import PromptBatch
from llmsql.udfs import CallKind

CAPS = Capabilities(prefix_caching=True, constrained_choice=True, block_size=1,
                    batch_prefix_sharing=True)
"""As the transformers backend reports itself."""
SHAPE = MoEShape(moe_layers=1, experts=8, top_k=2, hidden=4, intermediate=8)
PLUS, MINUS = ord("+"), ord("-")
TABLE = RoutingTable(layers=(0,), num_experts=8, top_k=2,
                     experts={PLUS: ((0, 1),), MINUS: ((2, 3),)})


def _bytes(text: str) -> list[int]:
    return list(text.encode())


def routing(step_rows: int = 2, table: RoutingTable | None = TABLE) -> ExpertRouting:
    return ExpertRouting(SHAPE, slots=4, step_rows=step_rows, table=table,
                         table_file="/m/llmsql_moe/predictor.routing.json",
                         tokenize=_bytes if table is not None else None, plan="lru")


def movies() -> PromptBatch:
    """Two movies (long shared synopses) of eight reviews each, signs alternating."""
    movie = [f"movie {m}: " + "a long synopsis " * 6 for m in (0, 1) for _ in range(8)]
    review = [f"review {k} {'+' if k % 2 else '-'}" for _ in (0, 1) for k in range(8)]
    return batch_of([movie, review], instruction="Summarize the review.")


def ctx_for(r: ExpertRouting | None, **kw: Any) -> RuleContext:
    return RuleContext(capabilities=CAPS, experts=lambda _model: r, **kw)


def prepared(b: PromptBatch) -> PromptBatch:
    return reorder_prompts(dedup_prompts(b, RuleContext()), RuleContext(capabilities=CAPS))


def test_without_expert_offload_nothing_changes_and_nothing_is_said() -> None:
    b = prepared(movies())
    assert expert_order(b, RuleContext(capabilities=CAPS)) is b  # no lookup (Spark workers)
    assert expert_order(b, ctx_for(None)) is b  # a model without expert offload options
    assert expert_order(b, ctx_for(routing(), reorder=False)) is b


def test_without_a_table_the_order_stays_and_the_note_says_why() -> None:
    b = prepared(movies())
    out = expert_order(b, ctx_for(routing(table=None)))
    assert out.order == b.order and out.batches == b.batches
    assert out.notes[-1] == ("expert_order: rows keep the prefix-group order (no routing "
                             "table at /m/llmsql_moe/predictor.routing.json: run llmsql "
                             "moe-profile)")


def test_rows_are_reordered_within_prefix_groups_by_predicted_experts() -> None:
    b = prepared(movies())
    out = expert_order(b, ctx_for(routing(step_rows=2)))
    order = list(out.send_order())
    assert sorted(order) == sorted(b.send_order())
    assert Counter(out.prompts(order)) == Counter(b.prompts(b.send_order()))
    # the movies stay contiguous and in the order reorder_prompts chose
    movie_of = [b.values[0][i] for i in order]
    assert movie_of == [b.values[0][i] for i in b.send_order()]
    # each batch of two rows holds one sign: its rows need the same predicted experts
    assert out.batches == tuple(range(0, 16, 2))
    for lo in out.batches:
        assert len({b.values[1][i][-1] for i in order[lo:lo + 2]}) == 1
    assert any(b.values[1][i][-1] != b.values[1][j][-1]  # (it was not so before)
               for i, j in zip(b.send_order()[::2], b.send_order()[1::2], strict=True))
    note = out.notes[-1]
    assert note.startswith("expert_order: ") and "within 2 prefix group(s)" in note
    assert "8 batch(es) of 2: predicted experts per batch 4 -> 2" in note


def test_the_whole_rule_list_keeps_the_bounds_and_later_rules_do_not_undo_them() -> None:
    out, trace = optimize(movies(), ctx_for(routing(step_rows=2)), rules=RULES)
    assert [t.rule for t in trace].index("expert_order") == 2
    assert out.batches == tuple(range(0, 16, 2))
    order = out.send_order()
    for lo in out.batches:
        assert len({out.values[1][i][-1] for i in order[lo:lo + 2]}) == 1


def test_calls_where_it_cannot_pay_keep_their_order_and_say_why() -> None:
    b = prepared(movies())
    big = expert_order(b, ctx_for(routing(step_rows=8)))
    assert big.order == b.order
    assert big.notes[-1].startswith("expert_order: rows keep the prefix-group order (a decode "
                                    "step of 8 rows uses about 90% of each layer's experts)")
    alone = expert_order(b, ctx_for(routing(step_rows=1)))  # one row a step: no order helps
    assert alone.order == b.order and alone.batches == b.batches
    assert alone.notes[-1].startswith("expert_order: the prefix-group order is kept (no order")
    call = dataclasses.replace(b.call, kind=CallKind.FILTER)
    scored = expert_order(dataclasses.replace(b, call=call), ctx_for(routing()))
    assert scored.order == b.order
    assert "the answers are scored choices, not decoded" in scored.notes[-1]


def test_flat_groups_never_split_a_deeper_shared_prefix() -> None:
    prompts = ["Q\ng: a\nm: 1\nr: x\n", "Q\ng: a\nm: 1\nr: y\n", "Q\ng: a\nm: 2\nr: x\n",
               "Q\ng: a\nm: 2\nr: z\n", "Q\ng: b\nm: 3\nr: x\n"]
    assert flat_groups(prompts) == [[0, 1], [2, 3], [4]]
    assert flat_groups(["Q\nr: 1\n", "Q\nr: 2\n", "Q\nr: 3\n"]) == [[0, 1, 2]]
    assert flat_groups([]) == []


# ---- a real query over a tiny MoE model ---------------------------------------------------

REVIEWS = pd.DataFrame({"id": range(12), "review": [
    f"Review {k}: " + ("I loved it" if k % 2 else "I hated it") for k in range(12)]})
SQL = "SELECT id, LLM('Describe it', review, max_tokens => 6) AS d FROM reviews ORDER BY id"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("llmsql.engine.moe.offload", reason="the expert offload engine is missing")
    from tests.moe_fixtures import write_tiny_moe

    return write_tiny_moe(tmp_path_factory.mktemp("moe") / "tiny-mixtral")


def _answers(folder: Path) -> tuple[list[dict[str, Any]], tuple[str, ...], str]:
    from llmsql.config import SessionConfig
    from llmsql.session import Session

    options = {"threads": 1, "dtype": "float32", "expert_cache": 0.5, "moe_plan": "lru",
               "predictor": "none", "batch_size": 2}
    with Session(SessionConfig(backend="transformers", model=str(folder), progress=False,
                               cache=False, backend_options=options)) as con:
        con.register("reviews", REVIEWS)
        rows = con.sql(SQL).arrow().to_pylist()
        assert con.last_stats is not None
        notes = con.last_stats.calls[0].notes
        return rows, notes, con.explain(SQL).text


def _table_for(folder: Path) -> RoutingTable:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    loved = tok.encode(" loved", add_special_tokens=False).ids
    hated = tok.encode(" hated", add_special_tokens=False).ids
    experts = {t: ((0, 1), (0, 1)) for t in loved} | {t: ((2, 3), (2, 3)) for t in hated}
    return RoutingTable(layers=(0, 1), num_experts=4, top_k=2, experts=experts)


def test_a_query_answers_the_same_with_rows_ordered_by_experts(tiny: Path) -> None:
    from llmsql.moe.affinity import save_table, table_path
    from llmsql.moe.options import default_profile_path

    table = table_path(default_profile_path(tiny))
    table.unlink(missing_ok=True)
    want, notes, _ = _answers(tiny)
    assert any(n.startswith("expert_order: rows keep the prefix-group order (no routing "
                            "table at ") for n in notes)
    save_table(_table_for(tiny), table)
    try:
        got, notes, explained = _answers(tiny)
    finally:
        table.unlink()
    assert got == want and len({r["d"] for r in want}) > 1
    note = next(n for n in notes if n.startswith("expert_order: "))
    assert "prompts moved within 1 prefix group(s), 6 batch(es) of 2" in note
    assert "rule expert_order: " in explained  # EXPLAIN shows it (the dry run orders too)


def test_a_small_predicted_saving_does_not_move_rows() -> None:
    table = RoutingTable(layers=(0,), num_experts=8, top_k=2, experts={
        PLUS: ((0, 1),), MINUS: ((2, 3),), ord("\n"): ((4, 5),)})
    review = [f"review {k} {'-' if k in (0, 3) else '+'}" for k in range(20)]
    b = prepared(batch_of([["one movie " * 8] * 20, review], instruction="Summarize."))
    out = expert_order(b, ctx_for(routing(step_rows=2, table=table)))
    # the two '-' rows in one batch: 40 predicted experts instead of 44, 9% fewer
    assert out.order == b.order and out.batches == b.batches
    assert out.notes[-1] == ("expert_order: the prefix-group order is kept (batches of 2 would "
                             "need 9% fewer predicted experts, under the 10% that could pay "
                             "for moving rows)")
