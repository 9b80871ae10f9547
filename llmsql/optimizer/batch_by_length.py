"""Rule: cut the send order into batches for the backend, without straggling or padding.

A batch ends at a prefix-group boundary when the next group would overflow it and the
batch is at least half full, so a group's members are computed together (one prefill of
their prefix on backends that share it within a batch) and batches hold prompts of similar
shape. Bounds set by an earlier rule (``warm_prefixes``' waves) are kept and only
subdivided.

Invariant: the send order is unchanged; only batch boundaries are set.

>>> from llmsql.optimizer._doctest import batch_of
>>> from llmsql.optimizer.context import RuleContext
>>> batch_by_length(batch_of([list("abcde")]), RuleContext(batch_size=2)).batches
(0, 2, 4)
>>> _cut(0, 3, 1, {0})  # one prompt per batch; a group starting at the batch start
[0, 1, 2]
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from llmsql.optimizer.prefix_groups import group_starts

if TYPE_CHECKING:
    from llmsql.optimizer.context import RuleContext
    from llmsql.plan import PromptBatch


def batch_by_length(batch: PromptBatch, ctx: RuleContext, /) -> PromptBatch:
    """Batches of at most ``ctx.batch_size`` prompts, cut at group boundaries when possible."""
    order = batch.send_order()
    n, size = len(order), max(1, ctx.batch_size)
    if n > size:
        batch = batch.with_rendered()
    waves = list(batch.batches) or [0]
    prompts = [batch.prompt(i) for i in order] if n > size else []
    starts = set(group_starts(prompts, min_shared=ctx.capabilities.block_size * 4))
    bounds: list[int] = []
    for lo, hi in zip(waves, [*waves[1:], n], strict=True):
        bounds += _cut(lo, hi, size, starts)
    note = f"batch_by_length: {len(bounds)} batch(es) of up to {size}"
    return dataclasses.replace(batch, batches=tuple(bounds), notes=(*batch.notes, note))


def _cut(lo: int, hi: int, size: int, starts: set[int]) -> list[int]:
    """Batch starts within [lo, hi): full batches, ended early at a group start when the
    batch is at least half full.
    """
    bounds: list[int] = []
    pos = lo
    while pos < hi:
        bounds.append(pos)
        end = min(pos + size, hi)
        if end < hi and end not in starts:
            half = pos + max(1, size // 2)  # a batch always holds at least one prompt
            early = max((s for s in starts if half <= s < end), default=None)
            end = early if early is not None else end
        pos = end
    return bounds
