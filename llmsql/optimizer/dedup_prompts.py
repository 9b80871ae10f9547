"""Rule: identical prompts of one call are evaluated once and fanned back out.

Invariant: the set of distinct prompts is unchanged and every row keeps its answer source
(``rep[i]`` renders exactly the prompt row ``i`` would). Applies only to reproducible calls
(``Volatility.IMMUTABLE``: temperature 0 or a fixed seed). Assumes nothing of earlier rules.

>>> from llmsql.optimizer._doctest import batch_of
>>> dedup_prompts(batch_of([["a", "b", "a"]]), None).rep
(0, 1, 0)
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING

from llmsql.udfs.base import Volatility

if TYPE_CHECKING:
    from llmsql.optimizer.context import RuleContext
    from llmsql.plan import PromptBatch


def dedup_prompts(batch: PromptBatch, ctx: RuleContext | None, /) -> PromptBatch:
    """Point every row at the first row with the same rendered values."""
    if batch.call.volatility is not Volatility.IMMUTABLE or batch.n_rows == 0:
        return batch
    first: dict[tuple[str, ...], int] = {}
    rep = tuple(map(first.setdefault, zip(*batch.values, strict=True), itertools.count()))
    if not batch.values:  # no fields: every row renders the bare instruction
        rep = tuple(0 for _ in range(batch.n_rows))
    dropped = batch.n_rows - len(set(rep))
    note = f"dedup_prompts: {batch.n_rows} rows -> {batch.n_rows - dropped} distinct prompts"
    return dataclasses.replace(batch, rep=rep, notes=(*batch.notes, note))
