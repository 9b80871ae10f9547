"""Prefix groups of a send order: runs of consecutive prompts sharing a cached prefix.

Shared helpers of ``warm_prefixes`` and ``batch_by_length`` (not a rule).

>>> shared = "Q\\nk: " + "a" * 80
>>> prompts = [shared + "\\nv: 1", shared + "\\nv: 2", "Q\\nk: b\\nv: 3"]
>>> group_starts(prompts, min_shared=64)
[0, 2]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence


def lcp(a: str, b: str) -> int:
    """Length of the longest common prefix (binary search over C-level slice compares)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def common_head(prompts: Sequence[str]) -> int:
    """Characters every prompt shares (the instruction, usually)."""
    if not prompts:
        return 0
    lo, hi = min(prompts), max(prompts)  # the LCP of a set is the LCP of its extremes
    return lcp(lo, hi)


def group_starts(prompts: Sequence[str], *, min_shared: int) -> list[int]:
    """Positions where a new group starts: a prompt sharing fewer than ``min_shared``
    characters beyond the common head with the prompt before it.
    """
    if not prompts:
        return []
    need = common_head(prompts) + min_shared
    # lcp(a, b) >= need exactly when both are that long and their first ``need`` characters
    # agree: one C-level compare per pair instead of a binary search
    short = [len(p) < need for p in prompts]
    heads = [p[:need] for p in prompts]
    return [0, *(k for k in range(1, len(prompts))
                 if short[k] or short[k - 1] or heads[k] != heads[k - 1])]
