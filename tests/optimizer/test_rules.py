"""The batch-level rules: each keeps its invariant on real workload-shaped data."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from llmsql.backends.base import Capabilities
from llmsql.optimizer import RULES, RuleContext, optimize
from llmsql.optimizer._doctest import batch_of
from llmsql.optimizer.batch_by_length import batch_by_length
from llmsql.optimizer.dedup_prompts import dedup_prompts
from llmsql.optimizer.reorder_prompts import reorder_prompts
from llmsql.optimizer.warm_prefixes import warm_prefixes
from llmsql.plan import PromptBatch

CONCURRENT = Capabilities(prefix_caching=True, block_size=16)
SHARING = Capabilities(prefix_caching=True, block_size=16, batch_prefix_sharing=True)


def movies(n: int = 120) -> PromptBatch:
    synopsis = [f"Synopsis of movie {i % 7}: " + "a long plot " * 12 for i in range(n)]
    genre = [["drama", "crime", "comedy"][i % 3] for i in range(n)]
    review = [f"review {i % 50} " + "x" * (i % 9) for i in range(n)]
    return batch_of([synopsis, genre, review], instruction="Recommend? Answer Yes or No.")


def row_fields(b: PromptBatch) -> Counter:
    """Multiset of (row, name -> value) over the prompts the batch sends."""
    out: Counter = Counter()
    for i in b.send_order():
        lines = b.prompt(i).splitlines()[1:]
        out[(i, frozenset(lines))] += 1
    return out


def test_dedup_keeps_the_set_of_distinct_prompts() -> None:
    b = movies()
    d = dedup_prompts(b, RuleContext())
    everything = {b.prompt(i) for i in range(b.n_rows)}
    assert {d.prompt(i) for i in d.send_order()} == everything
    assert len(d.send_order()) == len(everything)
    assert all(d.prompt(d.rep[i]) == b.prompt(i) for i in range(b.n_rows))


def test_dedup_does_not_apply_to_volatile_calls() -> None:
    import dataclasses

    from llmsql.udfs.base import CallOptions

    b = movies()
    call = dataclasses.replace(b.call, options=CallOptions(temperature=0.7))
    assert dedup_prompts(dataclasses.replace(b, call=call), RuleContext()).rep is None


def test_reorder_keeps_each_rows_fields_and_makes_groups_contiguous() -> None:
    d = dedup_prompts(movies(), RuleContext())
    r = reorder_prompts(d, RuleContext())
    assert row_fields(r) == row_fields(d)
    firsts = [r.prompt(i).splitlines()[1] for i in r.send_order()]
    assert firsts == sorted(firsts, key=firsts.index)  # each first line in one run


def test_reorder_keeps_the_written_field_order_for_a_call_with_an_adapter() -> None:
    """An adapter learned prompts in the written field order (training renders them through
    these rules too): its calls order rows, never fields, whatever rows a batch holds."""
    n = 60  # a short unique field first, a long shared one after it: worth swapping
    d = dedup_prompts(batch_of([[f"review {i}" for i in range(n)],
                                [f"Synopsis {i % 3}: " + "a long plot " * 20 for i in range(n)]],
                               instruction="Recommend? Answer Yes or No."), RuleContext())
    free = reorder_prompts(d, RuleContext())
    assert any(free.field_order_of(i) not in (None, (0, 1))
               for i in free.send_order())  # the check below can fail
    call = dataclasses.replace(d.call, options=dataclasses.replace(d.call.options,
                                                                   adapter="fresh"))
    r = reorder_prompts(dataclasses.replace(d, call=call), RuleContext())
    assert row_fields(r) == row_fields(d)
    assert {r.field_order_of(i) for i in r.send_order()} <= {None, (0, 1)}


def test_reorder_keeps_placeholder_field_order() -> None:
    b = batch_of([["x", "y", "x"], ["1", "2", "3"]], instruction="Rate {f1} then")
    r = reorder_prompts(b, RuleContext())
    assert all(r.field_order_of(i) in (None, (0,)) for i in range(3))
    assert [r.prompt(i) for i in r.send_order()] != []
    assert {r.prompt(i) for i in range(3)} == {b.prompt(i) for i in range(3)}


def test_warm_prefixes_warms_each_shared_prefix_once_and_keeps_the_order() -> None:
    ctx = RuleContext(capabilities=CONCURRENT, batch_size=64)
    r = reorder_prompts(dedup_prompts(movies(), ctx), ctx)
    w = warm_prefixes(r, ctx)
    assert w.send_order() == r.send_order()
    assert w.warmups
    for row, chars in w.warmups:
        prefix = w.prompt(row)[:chars]
        sharing = [i for i in w.send_order() if w.prompt(i).startswith(prefix)]
        assert len(sharing) >= 2  # a warm-up serves at least two prompts
    edges = [*w.batches, len(w.send_order())]
    assert all(hi - lo <= 64 for lo, hi in zip(edges, edges[1:], strict=False))
    assert "warm_prefixes" in w.notes[-1]


def test_warm_prefixes_windows_fit_a_quarter_of_the_cache() -> None:
    small = Capabilities(prefix_caching=True, block_size=16, cache_tokens=400)
    ctx = RuleContext(capabilities=small, batch_size=1000)
    w = warm_prefixes(reorder_prompts(dedup_prompts(movies(), ctx), ctx), ctx)
    per_window: dict[int, list[int]] = {}
    pos = {row: k for k, row in enumerate(w.send_order())}
    for row, chars in w.warmups:
        window = max(b for b in w.batches if b <= pos[row])
        per_window.setdefault(window, []).append(chars)
    assert len(w.batches) > 1
    # a window warms at most a quarter of the cache (400 tokens ~ 1600 chars / 4), unless a
    # single group's prefix alone is larger
    assert all(sum(c) <= 400 or len(c) == 1 for c in per_window.values())


@pytest.mark.parametrize("max_tokens", [48, 2])
def test_warm_prefixes_windows_keep_long_answers_kv_within_half_the_cache(
        max_tokens: int) -> None:
    caps = Capabilities(prefix_caching=True, block_size=16, cache_tokens=4000)
    ctx = RuleContext(capabilities=caps, batch_size=10_000)
    b = movies(600)
    b = dataclasses.replace(b, call=dataclasses.replace(
        b.call, options=dataclasses.replace(b.call.options, max_tokens=max_tokens)))
    w = warm_prefixes(reorder_prompts(dedup_prompts(b, ctx), ctx), ctx)
    edges = [*w.batches, len(w.send_order())]
    sizes = [hi - lo for lo, hi in zip(edges, edges[1:], strict=False)]
    assert sum(sizes) == 600
    if max_tokens >= 8:  # long answers: a window's own KV (>= rows x 48) fits half the cache
        assert len(sizes) > 7 and max(sizes) * max_tokens <= 2000
    else:  # short answers finish at once: only the prefix budget and batch size cut windows
        assert max(sizes) * 48 > 2000


def test_engines_sharing_prefixes_in_a_batch_get_kv_windows_but_no_warm_ups() -> None:
    caps = Capabilities(prefix_caching=True, block_size=16, cache_tokens=4000,
                        batch_prefix_sharing=True, scheduler_batching=True)
    ctx = RuleContext(capabilities=caps, batch_size=10_000)
    b = movies(600)
    long = dataclasses.replace(b, call=dataclasses.replace(
        b.call, options=dataclasses.replace(b.call.options, max_tokens=48)))
    w = warm_prefixes(reorder_prompts(dedup_prompts(long, ctx), ctx), ctx)
    edges = [*w.batches, len(w.send_order())]
    assert w.warmups == () and len(edges) > 8
    assert max(hi - lo for lo, hi in zip(edges, edges[1:], strict=False)) * 48 <= 2000
    short = dataclasses.replace(long, call=dataclasses.replace(
        long.call, options=dataclasses.replace(long.call.options, max_tokens=2)))
    r = reorder_prompts(dedup_prompts(short, ctx), ctx)
    assert warm_prefixes(r, ctx) is r


def test_warm_prefixes_is_skipped_where_batches_share_prefixes() -> None:
    ctx = RuleContext(capabilities=SHARING)
    r = reorder_prompts(dedup_prompts(movies(), ctx), ctx)
    assert warm_prefixes(r, ctx) is r


def test_batch_by_length_cuts_at_group_starts_and_keeps_order() -> None:
    ctx = RuleContext(capabilities=SHARING, batch_size=16)
    r = reorder_prompts(dedup_prompts(movies(), ctx), ctx)
    b = batch_by_length(r, ctx)
    assert b.send_order() == r.send_order()
    edges = [*b.batches, len(b.send_order())]
    assert all(0 < hi - lo <= 16 for lo, hi in zip(edges, edges[1:], strict=False))
    assert b.batches[0] == 0


def test_batch_by_length_keeps_wave_bounds() -> None:
    ctx = RuleContext(capabilities=CONCURRENT, batch_size=64)
    w = warm_prefixes(reorder_prompts(dedup_prompts(movies(), ctx), ctx), ctx)
    b = batch_by_length(w, ctx)
    assert set(w.batches) <= set(b.batches)


@pytest.mark.parametrize("caps", [CONCURRENT, SHARING])
def test_the_pipeline_preserves_every_rows_fields(caps: Capabilities) -> None:
    ctx = RuleContext(capabilities=caps, batch_size=32)
    b = movies()
    out, trace = optimize(b, ctx)
    assert [t.rule for t in trace] == [r.__name__ for r in RULES]
    assert row_fields(out) == row_fields(dedup_prompts(b, ctx))


def test_every_rule_is_tested() -> None:
    from pathlib import Path

    text = Path(__file__).read_text()
    for rule in RULES:
        assert f"def test_{rule.__name__.split('_')[0]}" in text or rule.__name__ in text


def test_all_placeholder_template_is_sorted_and_keeps_every_row() -> None:
    b = batch_of([["y", "x", "x" * 90, "x" * 90], ["1", "2", "3", "4"]],
                 instruction="Rate {f0} with {f1}")
    ctx = RuleContext(capabilities=CONCURRENT)
    out, _ = optimize(b, ctx)
    sent = [out.prompt(i) for i in out.send_order()]
    assert sorted(sent) == sent
    assert sorted(sent) == sorted(b.prompt(i) for i in range(4))


def test_warm_prefixes_warms_only_what_the_cost_model_says_pays() -> None:
    """Prefixes of ~50 tokens (the movies' synopses, shared by about 17 prompts each): worth
    warming with 16-token blocks and 8 requests at once; with 128-token blocks nothing of
    them can be cached, and with one request at a time no member computes them twice."""
    from llmsql.optimizer.warm_prefixes import warm_saving

    def run(caps: Capabilities) -> PromptBatch:
        ctx = RuleContext(capabilities=caps, batch_size=64)
        return warm_prefixes(reorder_prompts(dedup_prompts(movies(), ctx), ctx), ctx)

    eight = dataclasses.replace(CONCURRENT, concurrent_requests=8)
    pays = run(eight)
    assert pays.warmups and "predicted to save" in pays.notes[-1]
    for row, chars in pays.warmups:
        members = sum(1 for i in pays.send_order() if pays.prompt(i).startswith(
            pays.prompt(row)[:chars]))
        assert warm_saving(chars, members, eight) > 0
    big_blocks = run(dataclasses.replace(eight, block_size=128))
    assert not big_blocks.warmups
    one = run(dataclasses.replace(CONCURRENT, concurrent_requests=1))
    assert not one.warmups and "not warmed (predicted to cost more" in one.notes[-1]
    assert one.send_order() == pays.send_order()


def test_warm_prefixes_can_be_switched_off() -> None:
    ctx = RuleContext(capabilities=CONCURRENT, warm=False)
    r = reorder_prompts(dedup_prompts(movies(), ctx), ctx)
    assert warm_prefixes(r, ctx) is r



def _climate_rows(seed: int) -> list[list[str]]:
    """400 rows of the shared climate_fever table (claim, article, evidence), shuffled by
    ``seed``: claims and articles both repeat, so rows get different field orders."""
    import random

    import pyarrow.parquet as pq

    from tests.conftest import DATASETS

    table = pq.read_table(DATASETS / "climate_fever" / "claim_evidence.parquet",
                          columns=["claim", "article", "evidence"]).slice(0, 400)
    rows = list(zip(*[table.column(c).to_pylist() for c in table.column_names], strict=True))
    random.Random(seed).shuffle(rows)
    return [list(col) for col in zip(*rows, strict=True)]


def test_reorder_gives_each_row_the_same_prompt_whatever_the_input_order() -> None:
    """A row's field order (so its prompt and its answer) depends on the set of rows only:
    the same query over shuffled input sends the same prompts (issue 11)."""
    prompts = []
    for seed in range(4):
        b = dedup_prompts(batch_of(_climate_rows(seed), instruction="True?"), RuleContext())
        r = reorder_prompts(b, RuleContext())
        assert len(r.field_orders) > 1  # per-row field orders are really in play
        prompts.append(sorted(r.prompt(i) for i in r.send_order()))
    assert all(p == prompts[0] for p in prompts[1:])


def test_batch_size_one_gives_one_prompt_per_batch() -> None:
    """batch_size=1 used to loop forever when a prefix group started at every row."""
    ctx = RuleContext(capabilities=SHARING, batch_size=1)
    r = reorder_prompts(dedup_prompts(movies(), ctx), ctx)
    b = batch_by_length(r, ctx)
    assert b.batches == tuple(range(len(r.send_order())))


def test_expert_order_keeps_every_prompt_and_the_prefix_groups(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """(expert offload only; the rule's own tests: test_expert_order.py)"""
    import itertools
    import sys

    from llmsql.moe.affinity import ExpertRouting, RoutingTable
    from llmsql.moe.plan import MoEShape
    from llmsql.optimizer.expert_order import expert_order

    module = sys.modules["llmsql.optimizer.expert_order"]
    monkeypatch.setattr(module, "MIN_PREDICTED_SAVING", 0.0)  # (it predicts 4% here)
    table = RoutingTable((0,), 8, 2, {ord("x"): ((0, 1),), **{
        ord(c): ((2, 3) if c < "5" else (4, 5),) for c in "0123456789"}})
    routing = ExpertRouting(MoEShape(1, 8, 2, 4, 8), 4, 2, table, "t",
                            tokenize=lambda s: list(s.encode()), plan="lru")
    ctx = RuleContext(capabilities=SHARING, experts=lambda _model: routing)
    before = reorder_prompts(dedup_prompts(movies(), ctx), ctx)
    after = expert_order(before, ctx)
    assert after.order != before.order
    assert row_fields(after) == row_fields(before)

    def runs(b: PromptBatch) -> list[str]:  # the synopsis groups, in send order
        return [k for k, _ in itertools.groupby(b.values[0][i] for i in b.send_order())]

    assert runs(after) == runs(before)
