"""Prefix-affinity partitioning, as a pure function: prefix groups -> partitions.

On a cluster every partition of an LLM call's inputs is answered by the inference worker of
the executor that runs it, and prompts share KV-cache blocks only inside one worker. A
*prefix group* is the set of a call's distinct inputs that render the same leading field
value(s) under the optimizer's field order (e.g. every review of one movie when the synopsis
comes first); keeping a group in one partition keeps its shared prefix in one cache. Inside a
partition the LLM step's own rules (``reorder_prompts``) order the rows.

:func:`plan_partitions` assigns groups to ``n`` partitions so that the estimated prompt
tokens, not the row counts, are balanced (longest-processing-time first: the heaviest unit
goes to the lightest partition). A group heavier than the per-partition target by more than
``slack`` is split at a field boundary: into ``ceil(tokens / target)`` chunks by the value of
its next field (rows with equal values stay together), and the split is reported for EXPLAIN.
Which rows go to which chunk is the executor's business (a hash of that field's value).

Invariant: every group key is assigned; an unsplit group's rows all go to one partition.

>>> p = plan_partitions([Group(("a",), 60), Group(("b",), 30), Group(("c",), 30)], 2)
>>> p.partition_of(("a",)), p.partition_of(("b",)), p.partition_of(("c",))
(0, 1, 1)
>>> p.tokens
(60, 60)
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmsql.errors import PlanError

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["Group", "PartitionPlan", "Split", "describe", "field_priority", "plan_partitions"]

DEFAULT_SLACK = 0.25
"""A group may exceed the per-partition token target by this share before it is split."""


@dataclass(frozen=True, slots=True)
class Group:
    """One prefix group: its leading value(s), estimated prompt tokens and rows.

    ``splittable`` is False when the rows of the group cannot be told apart by a later
    field (a single row, or LLM_AGG groups, which are answered as one prompt).
    """

    key: tuple[Any, ...]
    tokens: int
    rows: int = 1
    splittable: bool = True


@dataclass(frozen=True, slots=True)
class Split:
    """A group too heavy for one partition, spread over ``partitions`` (one chunk each)."""

    key: tuple[Any, ...]
    tokens: int
    partitions: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PartitionPlan:
    """Where every prefix group goes, and the estimated load of every partition.

    Attributes:
        assignment: ``(group key, partition)`` for every group that is not split.
        splits: The split groups, each with the partitions its chunks go to (in chunk order).
        tokens: Estimated prompt tokens per partition.
        rows: Estimated rows per partition (a split group's rows are spread evenly).
    """

    assignment: tuple[tuple[tuple[Any, ...], int], ...]
    splits: tuple[Split, ...]
    tokens: tuple[int, ...]
    rows: tuple[int, ...]

    @property
    def n_partitions(self) -> int:
        """The number of partitions planned (some may be empty)."""
        return len(self.tokens)

    def partition_of(self, key: tuple[Any, ...], /) -> int | None:
        """The partition of an unsplit group (None for a split or unknown group)."""
        for k, p in self.assignment:
            if k == key:
                return p
        return None

    @property
    def imbalance(self) -> float:
        """Heaviest partition over the mean (1.0 is perfect balance)."""
        total = sum(self.tokens)
        return max(self.tokens) * len(self.tokens) / total if total else 1.0


@dataclass(frozen=True, slots=True)
class _Unit:
    group: int
    chunk: int
    tokens: int
    rows: int


def field_priority(saved_chars: Sequence[int], /) -> tuple[int, ...]:
    """Field indexes, most shareable characters first (ties: written order).

    ``saved_chars[j]`` is what field ``j``'s repeated values could save, i.e. the sum over
    its distinct values of ``len(line) x (count - 1)``: the same ranking
    :mod:`llmsql.optimizer.ordering` uses for its global field order.

    >>> field_priority([10, 500, 0, 500])
    (1, 3, 0, 2)
    """
    return tuple(sorted(range(len(saved_chars)), key=lambda j: (-saved_chars[j], j)))


def _units(groups: Sequence[Group], target: float, slack: float) -> list[_Unit]:
    units: list[_Unit] = []
    for g, group in enumerate(groups):
        chunks = 1
        if group.splittable and group.rows > 1 and group.tokens > target * (1 + slack):
            chunks = min(group.rows, math.ceil(group.tokens / target))
        for c in range(chunks):
            tokens = group.tokens // chunks + (1 if c < group.tokens % chunks else 0)
            rows = group.rows // chunks + (1 if c < group.rows % chunks else 0)
            units.append(_Unit(g, c, tokens, rows))
    return units


def plan_partitions(
    groups: Sequence[Group], n_partitions: int, /, *, slack: float = DEFAULT_SLACK
) -> PartitionPlan:
    """Assign prefix groups to ``n_partitions`` partitions, balancing estimated tokens.

    Args:
        groups: The prefix groups, in a stable order (ties are broken by it).
        n_partitions: How many partitions to fill (at least 1).
        slack: How far above ``total / n_partitions`` a group may go before it is split.

    Returns:
        The assignment, the splits and the estimated load of every partition.

    Raises:
        PlanError: ``n_partitions`` is below 1 or a group has negative tokens.

    >>> p = plan_partitions([Group(("big",), 90, rows=9), Group(("x",), 10)], 2)
    >>> p.splits
    (Split(key=('big',), tokens=90, partitions=(0, 1)),)
    >>> p.tokens
    (55, 45)
    """
    if n_partitions < 1:
        msg = f"plan_partitions needs at least one partition, got {n_partitions}"
        raise PlanError(msg)
    if any(g.tokens < 0 for g in groups):
        msg = "plan_partitions got a group with negative tokens"
        raise PlanError(msg)
    total = sum(g.tokens for g in groups)
    target = max(1.0, total / n_partitions)
    units = _units(groups, target, slack)
    heap = [(0, p) for p in range(n_partitions)]
    tokens = [0] * n_partitions
    rows = [0] * n_partitions
    placed: dict[tuple[int, int], int] = {}
    for i in sorted(range(len(units)), key=lambda i: (-units[i].tokens, i)):
        load, p = heapq.heappop(heap)
        u = units[i]
        placed[(u.group, u.chunk)] = p
        tokens[p] += u.tokens
        rows[p] += u.rows
        heapq.heappush(heap, (load + u.tokens, p))
    assignment: list[tuple[tuple[Any, ...], int]] = []
    splits: list[Split] = []
    chunks_of: dict[int, list[int]] = {}
    for u in units:
        chunks_of.setdefault(u.group, []).append(placed[(u.group, u.chunk)])
    for g, group in enumerate(groups):
        parts = chunks_of[g]
        if len(parts) == 1:
            assignment.append((group.key, parts[0]))
        else:
            splits.append(Split(group.key, group.tokens, tuple(parts)))
    return PartitionPlan(tuple(assignment), tuple(splits), tuple(tokens), tuple(rows))


def _short(value: Any, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def describe(
    plan: PartitionPlan, lead: str, /, *, groups: int, split_by: dict[tuple[Any, ...], str]
) -> tuple[str, ...]:
    """EXPLAIN lines: the groups, the partition loads and every split.

    Args:
        plan: The result of :func:`plan_partitions`.
        lead: The leading field(s) the groups are formed on, for the text.
        groups: How many prefix groups were planned.
        split_by: For each split group key, the field its chunks are cut on.

    >>> p = plan_partitions([Group(("big",), 90, rows=9), Group(("x",), 10)], 2)
    >>> describe(p, "synopsis", groups=2, split_by={("big",): "review"})[1]
    "split: synopsis='big' (90 est. tokens) cut by review over partitions 0, 1"
    """
    busy = [t for t in plan.tokens if t]
    lines = [
        (f"affinity partitioning on {lead}: {groups} prefix group(s) -> {plan.n_partitions} "
        f"partition(s), est. prompt tokens per partition {min(busy, default=0):,}.."
        f"{max(busy, default=0):,} (max/mean {plan.imbalance:.2f})")
    ]
    for s in plan.splits:
        value = s.key[0] if len(s.key) == 1 else s.key
        lines.append(
            f"split: {lead}={_short(value)} ({s.tokens:,} est. tokens) cut by "
            f"{split_by.get(s.key, '?')} over partitions {', '.join(map(str, s.partitions))}"
        )
    return tuple(lines)
