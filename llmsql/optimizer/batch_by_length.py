"""Rule: cut the send order into batches for the backend.

Invariant: the send order is unchanged; only batch boundaries are set, so a prefix group
formed by ``reorder_prompts`` stays together inside consecutive batches.

>>> from llmsql.optimizer._doctest import batch_of
>>> batch_by_length(batch_of([list("abcde")]), RuleContext(batch_size=2)).batches
(0, 2, 4)
"""

from __future__ import annotations

import dataclasses

from llmsql.optimizer.context import RuleContext
from llmsql.plan import PromptBatch


def batch_by_length(batch: PromptBatch, ctx: RuleContext, /) -> PromptBatch:
    """Batches of ``ctx.batch_size`` consecutive prompts of the send order."""
    n = len(batch.send_order())
    bounds = tuple(range(0, n, max(1, ctx.batch_size)))
    note = f"batch_by_length: {len(bounds)} batch(es) of up to {ctx.batch_size}"
    return dataclasses.replace(batch, batches=bounds, notes=(*batch.notes, note))
