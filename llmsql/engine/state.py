"""The decoding state of a batch of rows, and the tensor helpers that build it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from collections.abc import Sequence

    from transformers import DynamicCache


@dataclass(slots=True)
class Rows:
    """Decoding state of a batch of rows (mutated in place by the decode loop)."""

    cache: DynamicCache
    mask: torch.Tensor
    """(rows, cache length): 1 where the cache holds a real token, 0 for padding."""
    next_pos: torch.Tensor
    """(rows,): position id of each row's next token."""
    logits: torch.Tensor
    """(rows, vocab): float32 logits for each row's next token."""

    def keep(self, going: list[int]) -> Rows:
        """The state of rows ``going`` only (all rows: ``self`` unchanged; none: ``self``)."""
        if len(going) == len(self.next_pos) or not going:
            return self
        index = self.next_pos.new_tensor(going)
        self.cache.batch_select_indices(index)
        return Rows(self.cache, self.mask[index], self.next_pos[index], self.logits[index])


def long_tensor(data: object, device: str) -> torch.Tensor:
    """``data`` (nested lists of ints) as a long tensor on ``device``."""
    return torch.tensor(data, dtype=torch.long, device=device)


def left_pad(
    seqs: Sequence[Sequence[int]], pad: int, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (ids, mask), both (len(seqs), longest), padded on the left."""
    width = max(len(s) for s in seqs)
    ids = [[pad] * (width - len(s)) + list(s) for s in seqs]
    mask = [[0] * (width - len(s)) + [1] * len(s) for s in seqs]
    return long_tensor(ids, device), long_tensor(mask, device)


def right_pad(
    seqs: Sequence[Sequence[int]], pad: int, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (ids, mask), both (len(seqs), longest), padded on the right."""
    width = max(len(s) for s in seqs)
    ids = [list(s) + [pad] * (width - len(s)) for s in seqs]
    mask = [[1] * len(s) + [0] * (width - len(s)) for s in seqs]
    return long_tensor(ids, device), long_tensor(mask, device)


def cat_columns(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Concatenate two (rows, columns) masks along the columns."""
    return torch.cat([left.to(right.dtype), right], dim=-1)
