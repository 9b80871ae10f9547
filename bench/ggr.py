"""GGR, the baseline: Greedy Group Recursion from Liu et al., MLSys 2025.

"Optimizing LLM Queries in Relational Data Analytics Workloads" (arXiv:2403.05821),
Algorithm 1, re-implemented from the paper and its artifact (``QuickGreedy.reorder``) so
that llmsql's own ordering (:mod:`llmsql.optimizer.ordering`) can be measured against it.
It is a benchmark baseline, not used by the planner.

What the artifact does, and this module reproduces (without the artifact's pandas
per-row machinery, and without functional-dependency hints, which the paper's queries
pass as column merges we do not use):

1. A table cell is the rendered field ``f"{name}: {value}"``; a value's weight is
   ``len(cell) ** 2``.
2. Column statistics: ``score = (rows - distinct) x mean(len(cell)) ** 2``. Columns with more
   than ``distinct_value_threshold x rows`` distinct values are left out of the recursion
   and appended after the others, best score first.
3. ``fixed_reorder``: the remaining columns in score order, rows sorted by them.
4. The sorted table is halved recursively into chunks of at most ``chunk_rows`` rows (the
   artifact's ``base = 2000``, used when ``parallel=True``, its default), and each chunk is
   reordered on its own. ``chunk_rows=len(rows)`` gives the artifact's ``parallel=False``
   path: one recursion over the whole table. On W1-W4 this variant matches the GGR figures
   of issue 3 to within 0.002 (W2: lru 0.370 against 0.369, prev_lcp 0.430 against 0.429);
   the chunked default scores higher on W2 (0.378).
5. ``recursive_reorder``: pick the value with the largest hit count
   ``len(cell) ** 2 x (count - 1)`` (ties: first in row-major order, approximated by the first
   occurrence when the part was formed); the rows holding it get its column first and
   recurse on their other columns; the other rows recurse as a new table. When the best hit
   count is 0 the rows keep their current column order. Counts are kept in a heap with lazy
   updates instead of being recounted after each pick, which gives the same choices.
6. Finally all rows are sorted by their cells in their own column order (the artifact's last
   ``sort_values`` over every column), which fixes the send order.

>>> o = ggr([["a", "b", "a"], ["1", "2", "3"]], ["k", "v"])
>>> o.rows, o.field_orders
((0, 2, 1), ((0, 1),))
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from typing import TYPE_CHECKING

from llmsql.optimizer.ordering import Ordering

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["ggr"]


def _column_stats(cells: list[list[str]]) -> list[tuple[int, int]]:
    """``(score, distinct)`` per column, with the artifact's score."""
    out = []
    for col in cells:
        n = len(col)
        distinct = len(set(col))
        avg = sum(map(len, col)) / n if n else 0.0
        out.append((int((n - distinct) * avg**2), distinct))
    return out


class _Chunk:
    """One chunk's recursion state: ``perm[r][:depth]`` settled, the rest positional."""

    def __init__(self, cells: list[list[str]], perm: dict[int, list[int]]) -> None:
        self.cells = cells
        self.perm = perm

    def reorder(self, rows: list[int], depth: int) -> None:
        if len(rows) < 2:
            return
        count: Counter[tuple[int, str]] = Counter()
        holders: dict[tuple[int, str], list[int]] = defaultdict(list)
        first: dict[tuple[int, str], tuple[int, int]] = {}
        for pos, r in enumerate(rows):
            for k, f in enumerate(self.perm[r][depth:]):
                item = (f, self.cells[f][r])
                count[item] += 1
                holders[item].append(r)
                first.setdefault(item, (pos, k))
        heap = [(-self._hits(it, c), first[it], it) for it, c in count.items()]
        heapq.heapify(heap)
        alive = dict.fromkeys(rows, True)
        while heap:
            neg, order, item = heapq.heappop(heap)
            hits = self._hits(item, count[item])
            if hits != -neg:  # stale entry: counts dropped since it was pushed
                heapq.heappush(heap, (-hits, order, item))
                continue
            if hits <= 0:
                break
            group = [r for r in holders[item] if alive[r]]
            for r in group:
                alive[r] = False
                for f in self.perm[r][depth:]:
                    count[(f, self.cells[f][r])] -= 1
                self.perm[r].remove(item[0])
                self.perm[r].insert(depth, item[0])
            self.reorder(group, depth + 1)

    def _hits(self, item: tuple[int, str], count: int) -> int:
        return len(item[1]) ** 2 * (count - 1)


def _chunks(rows: list[int], chunk_rows: int) -> list[list[int]]:
    """The artifact's recursive halving until a part has at most ``chunk_rows`` rows."""
    if len(rows) <= chunk_rows:
        return [rows]
    mid = len(rows) // 2
    return _chunks(rows[:mid], chunk_rows) + _chunks(rows[mid:], chunk_rows)


def ggr(
    columns: Sequence[Sequence[str]],
    names: Sequence[str],
    *,
    distinct_value_threshold: float = 0.8,
    chunk_rows: int = 2000,
) -> Ordering:
    """Order rows and per-row fields with GGR (the paper's algorithm, as in its artifact).

    Args:
        columns: ``columns[j][i]`` is the rendered value of field ``j`` in row ``i``.
        names: Field names, one per column.
        distinct_value_threshold: Columns with more distinct values than this share of the
            rows are not recursed on and go last (the artifact's default, 0.8).
        chunk_rows: The artifact's ``base``: the table is split into parts of at most this
            many rows, each reordered independently, before the final sort.

    Returns:
        The :class:`~llmsql.optimizer.ordering.Ordering` GGR produces.
    """
    m = len(columns)
    n = len(columns[0]) if m else 0
    if n == 0 or m == 0:
        return Ordering.table_order(n, m)
    cells = [[f"{name}: {v}" for v in col] for name, col in zip(names, columns, strict=True)]
    stats = _column_stats(cells)
    by_score = sorted(range(m), key=lambda j: -stats[j][0])  # stable, like list.sort
    dropped = [j for j in by_score if stats[j][1] > distinct_value_threshold * n]
    kept = [j for j in by_score if j not in dropped]
    start = sorted(range(n), key=lambda r: tuple(cells[j][r] for j in kept))
    perm = {r: list(kept) for r in range(n)}
    chunk = _Chunk(cells, perm)
    for part in _chunks(start, chunk_rows):
        chunk.reorder(part, 0)
    full = {r: perm[r] + dropped for r in range(n)}
    rows = sorted(range(n), key=lambda r: tuple(cells[j][r] for j in full[r]))
    orders: dict[tuple[int, ...], int] = {}
    index = [orders.setdefault(tuple(full[r]), len(orders)) for r in rows]
    return Ordering(tuple(rows), tuple(orders), tuple(index))
