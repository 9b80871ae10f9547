"""The optimizer: ordered tuples of pure passes, at two levels.

1. **Plan level**, once per statement before any of it runs: :data:`PLAN_PASSES`, each a
   function ``(QueryPlan, PlanContext) -> QueryPlan``, run by :func:`optimize_plan`. A plan
   pass may ask the running system for figures only through the context's sampler
   callback (:class:`PlanContext`).
2. **Prompt level**, once per LLM call while it runs, over its bound inputs: :data:`RULES`,
   each a function ``(PromptBatch, RuleContext) -> PromptBatch``, run by :func:`optimize`.

Plan passes come first because they decide which rows each call sees (a filter chained
after a selective one gets fewer rows); the prompt rules then order and batch exactly the
prompts that call sends. ``optimize_plan()`` and ``optimize()`` are the only places that
loop over passes and rules; each records a trace entry per pass or rule and wraps
unexpected failures in :class:`OptimizerError` (what a plan pass's callback raises
propagates as it is: it is the system's error, not the pass's).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from llmsql.errors import LLMSQLError, OptimizerError
from llmsql.optimizer.batch_by_length import batch_by_length
from llmsql.optimizer.context import RuleContext
from llmsql.optimizer.dedup_prompts import dedup_prompts
from llmsql.optimizer.expert_order import expert_order
from llmsql.optimizer.order_llm_predicates import order_llm_predicates
from llmsql.optimizer.plan_context import PlanContext, PredicateSample, Sampler
from llmsql.optimizer.reorder_prompts import reorder_prompts
from llmsql.optimizer.warm_prefixes import warm_prefixes
from llmsql.plan import LLMCall, PromptBatch, QueryPlan

_T = TypeVar("_T")
_C = TypeVar("_C")

PlanPass = Callable[[QueryPlan, PlanContext], QueryPlan]

PLAN_PASSES: tuple[PlanPass, ...] = (
    # First (and so far only): it decides the order of a scope's LLM filters, hence how many
    # rows each one (and every call after it) is sent. It plans the statement again from
    # the tree in the chosen order, so a pass that rewrites the plan's calls comes after it.
    order_llm_predicates,
)

Rule = Callable[[PromptBatch, RuleContext], PromptBatch]

RULES: tuple[Rule, ...] = (
    # First: collapse identical prompts, so later rules order and batch only what is sent.
    dedup_prompts,
    # Then choose row and field order over the distinct prompts (needs dedup's reps).
    reorder_prompts,
    # Within those prefix groups, rows whose predicted experts overlap share an engine step
    # (expert offload with a routing table only; sets batches of the engine's step size).
    expert_order,
    # Needs contiguous prefix groups: windows that fit the engine's cache, and one warm-up
    # per shared prefix where the engine does not share prefixes within a batch.
    warm_prefixes,
    # Last: cut the final send order into batches without changing it (keeps waves).
    batch_by_length,
)


@dataclass(frozen=True, slots=True)
class TraceEntry:
    """One rule's or plan pass's run: its name and how long it took."""

    rule: str
    seconds: float


def _run_in_order(
    value: _T, ctx: _C, steps: tuple[Callable[[_T, _C], _T], ...],
    passthrough: Sequence[BaseException] = (),
) -> tuple[_T, tuple[TraceEntry, ...]]:
    """Apply ``steps`` in order, timing each; an unexpected failure becomes an
    :class:`OptimizerError` naming the step (an :class:`LLMSQLError`, or one of the
    ``passthrough`` exceptions, propagates unchanged).
    """
    trace: list[TraceEntry] = []
    for step in steps:
        start = time.perf_counter()
        try:
            value = step(value, ctx)
        except LLMSQLError:
            raise
        except Exception as exc:
            if any(exc is e for e in passthrough):
                raise
            msg = f"{type(exc).__name__}: {exc}"
            raise OptimizerError(msg, rule=step.__name__) from exc
        trace.append(TraceEntry(step.__name__, time.perf_counter() - start))
    return value, tuple(trace)


def optimize(
    batch: PromptBatch, ctx: RuleContext, /, *, rules: tuple[Rule, ...] = RULES
) -> tuple[PromptBatch, tuple[TraceEntry, ...]]:
    """Run ``rules`` in order; return the rewritten batch and the trace."""
    return _run_in_order(batch, ctx, rules)


def optimize_plan(
    plan: QueryPlan, ctx: PlanContext, /, *, passes: tuple[PlanPass, ...] = PLAN_PASSES
) -> tuple[QueryPlan, tuple[TraceEntry, ...]]:
    """Run the plan ``passes`` in order; return the rewritten plan and the trace.

    Raises:
        OptimizerError: a pass failed unexpectedly (an :class:`LLMSQLError`, or anything
            the context's sampler raised, propagates unchanged).
    """
    escaped: list[BaseException] = []

    def sample(call: LLMCall) -> PredicateSample:
        try:
            return ctx.sample(call)
        except BaseException as exc:
            escaped.append(exc)
            raise

    return _run_in_order(plan, dataclasses.replace(ctx, sample=sample), passes, escaped)


__all__ = [
    "PLAN_PASSES",
    "RULES",
    "PlanContext",
    "PlanPass",
    "PredicateSample",
    "Rule",
    "RuleContext",
    "Sampler",
    "TraceEntry",
    "optimize",
    "optimize_plan",
]
