"""The optimizer: an ordered tuple of pure rules over a :class:`PromptBatch`.

``optimize()`` is the only place that loops over rules; it records a trace entry per rule
and wraps unexpected failures in :class:`OptimizerError`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from llmsql.errors import LLMSQLError, OptimizerError
from llmsql.optimizer.batch_by_length import batch_by_length
from llmsql.optimizer.context import RuleContext
from llmsql.optimizer.dedup_prompts import dedup_prompts
from llmsql.optimizer.reorder_prompts import reorder_prompts
from llmsql.optimizer.warm_prefixes import warm_prefixes
from llmsql.plan import PromptBatch

Rule = Callable[[PromptBatch, RuleContext], PromptBatch]

RULES: tuple[Rule, ...] = (
    # First: collapse identical prompts, so later rules order and batch only what is sent.
    dedup_prompts,
    # Then choose row and field order over the distinct prompts (needs dedup's reps).
    reorder_prompts,
    # Needs contiguous prefix groups: windows that fit the engine's cache, and one warm-up
    # per shared prefix where the engine does not share prefixes within a batch.
    warm_prefixes,
    # Last: cut the final send order into batches without changing it (keeps waves).
    batch_by_length,
)


@dataclass(frozen=True, slots=True)
class TraceEntry:
    """One rule's run: its name and how long it took."""

    rule: str
    seconds: float


def optimize(
    batch: PromptBatch, ctx: RuleContext, /, *, rules: tuple[Rule, ...] = RULES
) -> tuple[PromptBatch, tuple[TraceEntry, ...]]:
    """Run ``rules`` in order; return the rewritten batch and the trace."""
    trace: list[TraceEntry] = []
    for rule in rules:
        start = time.perf_counter()
        try:
            batch = rule(batch, ctx)
        except LLMSQLError:
            raise
        except Exception as exc:
            raise OptimizerError(f"{type(exc).__name__}: {exc}", rule=rule.__name__) from exc
        trace.append(TraceEntry(rule.__name__, time.perf_counter() - start))
    return batch, tuple(trace)


__all__ = ["RULES", "Rule", "RuleContext", "TraceEntry", "optimize"]
