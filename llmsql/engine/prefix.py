"""Shared-prefix planning: which prompts of a batch share a token prefix worth computing once.

Pure Python (no torch): the runner (:mod:`llmsql.engine.runner`) uses it to build a batch's
KV cache, and anything planning batches (a cost model, a scheduler) can call it on token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

T = TypeVar("T")

MIN_SHARED_PREFIX = 8
"""Shortest prefix worth a separate forward pass (in tokens)."""


@dataclass(frozen=True, slots=True)
class PrefixGroup:
    """A contiguous run ``[start, stop)`` of prompts that share their first ``prefix_len`` tokens.

    ``prefix_len`` is 0 for a prompt that shares nothing worth reusing (a group of one).
    """

    start: int
    stop: int
    prefix_len: int


def common_prefix_len(a: Sequence[int], b: Sequence[int], /) -> int:
    """Return the number of leading items ``a`` and ``b`` share.

    >>> common_prefix_len([1, 2, 3], [1, 2, 4, 5])
    2
    """
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def plan_prefix_groups(
    seqs: Sequence[Sequence[int]], /, *, min_prefix: int = MIN_SHARED_PREFIX
) -> list[PrefixGroup]:
    """Split ``seqs`` (sorted, ideally) into contiguous groups that maximize reused tokens.

    A group of ``k`` sequences sharing ``p`` leading tokens saves ``(k - 1) * p`` tokens; the
    split maximizes the total by dynamic programming (``O(n^2)``, ``n`` is a batch). A shared
    prefix always leaves each member at least one token of its own (the last prompt token
    must run to give the next-token logits).

    Args:
        seqs: Token id sequences, in the order the groups must follow.
        min_prefix: Shortest shared prefix worth using.

    Returns:
        Groups covering ``seqs`` in order; singletons have ``prefix_len == 0``.

    >>> plan_prefix_groups([[1, 2, 3], [1, 2, 4], [7, 8]], min_prefix=2)
    [PrefixGroup(start=0, stop=2, prefix_len=2), PrefixGroup(start=2, stop=3, prefix_len=0)]
    """
    n = len(seqs)
    adjacent = [common_prefix_len(seqs[i], seqs[i + 1]) for i in range(n - 1)]
    best, cut, plen = [0] * (n + 1), list(range(-1, n)), [0] * (n + 1)
    for j in range(1, n + 1):
        best[j] = best[j - 1]
        shared, shortest = len(seqs[j - 1]), len(seqs[j - 1])
        for i in range(j - 2, -1, -1):
            shared, shortest = min(shared, adjacent[i]), min(shortest, len(seqs[i]))
            p = min(shared, shortest - 1)
            if p < min_prefix:
                break  # p only shrinks as the group grows to the left
            if best[i] + (j - 1 - i) * p > best[j]:
                best[j], cut[j], plen[j] = best[i] + (j - 1 - i) * p, i, p
    return _backtrack_groups(cut, plen, n)


def _backtrack_groups(cut: list[int], plen: list[int], n: int) -> list[PrefixGroup]:
    groups: list[PrefixGroup] = []
    j = n
    while j > 0:
        groups.append(PrefixGroup(cut[j], j, plen[j]))
        j = cut[j]
    return groups[::-1]


def cached_counts(order: Sequence[int], groups: Sequence[PrefixGroup]) -> list[int]:
    """Per row: its group's prefix length, except 0 for the group's first row in input order.

    ``order[r]`` is row ``r``'s position in the caller's input (the member that comes first
    there pays for the prefix).

    >>> cached_counts([5, 2, 9], [PrefixGroup(0, 2, 4), PrefixGroup(2, 3, 0)])
    [4, 0, 0]
    """
    counts = [0] * len(order)
    for g in groups:
        if g.prefix_len == 0:
            continue
        payer = min(range(g.start, g.stop), key=lambda r: order[r])
        for r in range(g.start, g.stop):
            counts[r] = 0 if r == payer else g.prefix_len
    return counts


def chunks(items: Sequence[T], weight: Callable[[T], int], budget: int) -> Iterator[list[T]]:
    """Yield consecutive chunks of total ``weight`` within ``budget`` (at least one item each).

    >>> list(chunks([1, 2, 3, 4], lambda x: x, 5))
    [[1, 2], [3], [4]]
    """
    chunk: list[T] = []
    total = 0
    for item in items:
        if chunk and total + weight(item) > budget:
            yield chunk
            chunk, total = [], 0
        chunk.append(item)
        total += weight(item)
    if chunk:
        yield chunk
