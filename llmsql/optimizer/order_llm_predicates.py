"""Plan pass: order a scope's LLM_FILTER conjuncts by estimated cost x selectivity.

Filters ANDed in one WHERE are evaluated as a chain: each one sees only the rows that
passed the filters before it, so the order decides how many prompts are sent. For filters
with per-row cost ``c`` and pass rate ``s`` the expected cost ``c1 + s1 c2 + s1 s2 c3 ...`` is
smallest when they run in increasing ``c / (1 - s)`` (the classic predicate-ordering rank).
Selectivity comes from a small sample of each filter's own inputs, answered first with the
real backend through :attr:`PlanContext.sample`; those answers are reused by the full run,
never paid twice. Cost comes from token counts (prompt tokens per input row, distinct
prompts per row included).

Invariant: the query's result is unchanged (AND is commutative; every row still meets every
filter before it is returned). Assumes the planner's chaining of WHERE conjuncts, and a
plan made from ``ctx.tree`` in written order.

>>> order = rank([PredicateEstimate((0, 0), 0.9, 300.0), PredicateEstimate((0, 1), 0.1, 500.0)])
>>> sorted(order, key=order.get)
[(0, 1), (0, 0)]
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlglot import exp

from llmsql.optimizer.plan_context import SAMPLE_ROWS, PlanContext, PredicateSample
from llmsql.planner import llm_filter_groups, plan_query, sampled

if TYPE_CHECKING:
    from collections.abc import Sequence

    from llmsql.plan import LLMCall, QueryPlan

__all__ = ["SAMPLE_ROWS", "PredicateEstimate", "estimate", "order_llm_predicates", "rank"]


@dataclass(frozen=True, slots=True)
class PredicateEstimate:
    """What the sample said about one LLM_FILTER conjunct."""

    conjunct: tuple[int, int]
    selectivity: float
    """Share of sampled inputs answered TRUE."""
    tokens_per_row: float
    """Prompt tokens the filter costs per input row."""


def order_llm_predicates(plan: QueryPlan, ctx: PlanContext, /) -> QueryPlan:
    """``plan`` with each scope's LLM filters in cost x selectivity order.

    Planner calls: the planner builds a filter's input query from the filters planned
    before it, so a filter's own, unfiltered inputs exist only in a plan where it runs
    first. The pass therefore plans the statement once per candidate filter (a probe,
    ids ``<query_id>p<k>``, whose call it samples) and once more in the chosen order (ids
    ``<query_id>o``): 1 + N plans on top of the caller's written-order one, which is
    returned as it is when nothing may be reordered. The sampler is called once per
    candidate filter, in written order; a filter whose inputs read another LLM call's
    answers keeps the written order for the whole statement (the samples taken so far
    stay answered).
    """
    groups = llm_filter_groups(ctx.tree) if ctx.reorder else []
    estimates = []
    for scope_no, conjuncts in groups:
        for k in conjuncts:
            call = _probe(ctx, (scope_no, k), f"{ctx.query_id}p{k}")
            if _reads_llm_answers(call):
                return plan
            estimates.append(_estimate_of((scope_no, k), ctx.sample(_sample_call(call, ctx))))
    if not estimates:
        return plan
    return plan_query(ctx.sql, ctx.tree, query_id=f"{ctx.query_id}o",
                      predicate_order=rank(estimates))


def _probe(ctx: PlanContext, conjunct: tuple[int, int], query_id: str) -> LLMCall:
    """The call of ``conjunct`` planned to run first in its scope (over its own inputs)."""
    probe = plan_query(ctx.sql, ctx.tree, query_id=query_id, predicate_order={conjunct: -1.0})
    return next(c for c in probe.calls if c.conjunct == conjunct)


def _reads_llm_answers(call: LLMCall) -> bool:
    """Whether the call's inputs depend on other LLM calls (they read their lookups)."""
    return any(t.name.startswith("__llmsql_") for t in call.input.find_all(exp.Table))


def _sample_call(call: LLMCall, ctx: PlanContext) -> LLMCall:
    """``call`` over a reproducible sample of ``ctx.sample_rows`` of its inputs, under ids
    of its own (``<id>s``) so its lookup never meets the real call's.
    """
    return dataclasses.replace(call, id=f"{call.id}s", lookup=f"{call.lookup}s",
                               input=sampled(call.input, ctx.sample_rows))


def _estimate_of(conjunct: tuple[int, int], s: PredicateSample) -> PredicateEstimate:
    return estimate(conjunct, rows=s.rows, distinct=s.distinct, true=s.true,
                    prompt_tokens=s.prompt_tokens, answered=s.answered)


def rank(estimates: Sequence[PredicateEstimate], /) -> dict[tuple[int, int], float]:
    """Position per conjunct (lower runs first), by cost / (1 - selectivity); ties and
    filters that drop nothing keep the written order.
    """

    def key(e: PredicateEstimate) -> tuple[float, int]:
        drop = 1.0 - min(max(e.selectivity, 0.0), 1.0)
        return (e.tokens_per_row / drop if drop > 0 else math.inf, e.conjunct[1])

    return {e.conjunct: float(pos) for pos, e in enumerate(sorted(estimates, key=key))}


def estimate(
    conjunct: tuple[int, int], *, rows: int, distinct: int, true: int, prompt_tokens: int,
    answered: int,
) -> PredicateEstimate:
    """An estimate from a sample run's counts (rows sampled, distinct prompts...)."""
    sel = true / distinct if distinct else 1.0
    per_prompt = prompt_tokens / answered if answered else 0.0
    per_row = per_prompt * (distinct / rows if rows else 1.0)
    return PredicateEstimate(conjunct, sel, per_row)
