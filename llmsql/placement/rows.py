"""Row placement: which prefix groups run on the cheap local worker, which on the GPU.

A *group* is a tuple of rows sharing a prompt prefix; a row is ``(uncached_prompt_tokens,
output_tokens)``, the caller having charged the shared prefix to the group's first row only.
A group is placed whole (splitting it loses its prefix reuse). A side's time for a set of
groups is the sum of its rows' :class:`~llmsql.placement.profile.RowCost` seconds divided by
the side's concurrency; *GPU-seconds* is the GPU side's time.

:func:`place_rows_dp` minimises GPU-seconds subject to both sides finishing by the deadline:
a 0/1 knapsack over local time (choose groups for local, local time <= deadline, maximise GPU
time saved; then the GPU's remaining time must be <= deadline).

Resolution: local times are counted in buckets of ``resolution = ceil(deadline_us /
max_buckets)`` microseconds and rounded UP, so a placement the DP calls feasible truly is.
With integer-microsecond local costs and ``deadline <= max_buckets`` microseconds the bucket
is 1 us and the DP is exact. The DP keeps only Pareto states (less local time, less GPU time),
so it costs O(groups x buckets) at most. It also runs :func:`place_rows_greedy` and returns
the better of the two, so it is never worse than greedy.

>>> from llmsql.placement.profile import RowCost
>>> groups = [((100, 5),), ((400, 5), (50, 5)), ((200, 5),)]
>>> gpu, local = RowCost(0.0, 0.001, 0.01), RowCost(0.0, 0.01, 0.1)
>>> p = place_rows_dp(groups, gpu=gpu, local=local, deadline=6.0)
>>> p.local_groups, round(p.gpu_seconds, 6), p.feasible
((1,), 0.4, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmsql.errors import ConfigError, PlanError

if TYPE_CHECKING:
    from llmsql.placement.profile import RowCost

Row = tuple[int, int]
Group = Sequence[Row]
TOLERANCE = 1e-9
"""Relative slack of every feasibility check (float sums of costs against a deadline)."""
DEFAULT_MAX_BUCKETS = 4096


@dataclass(frozen=True)
class Placement:
    """Where each group runs and what that is predicted to cost.

    ``local_groups``: indices of the groups run locally (the rest run on the GPU);
    ``gpu_seconds`` / ``local_seconds``: each side's predicted time; ``makespan``: the larger;
    ``feasible``: both sides finish by ``deadline``; ``method``: ``"dp"``, ``"greedy"`` or
    ``"best-effort"`` (infeasible: the split with the least makespan found).
    """

    local_groups: tuple[int, ...]
    gpu_seconds: float
    local_seconds: float
    deadline: float
    feasible: bool
    method: str

    @property
    def makespan(self) -> float:
        """When the later side finishes (seconds from the start)."""
        return max(self.gpu_seconds, self.local_seconds)


def group_seconds(
    groups: Sequence[Group], cost: RowCost, concurrency: int = 1
) -> tuple[float, ...]:
    """Each group's time on a side: its rows' seconds summed, divided by ``concurrency``."""
    if concurrency < 1:
        msg = f"concurrency must be >= 1, got {concurrency}"
        raise ConfigError(msg)
    if not groups:
        msg = "row placement got no groups; there is nothing to place"
        raise PlanError(msg)
    out = []
    for i, group in enumerate(groups):
        if not group:
            msg = f"group {i} has no rows; every prefix group holds at least one row"
            raise PlanError(msg)
        for p, o in group:
            if p < 0 or o < 0:
                msg = f"group {i} has a row with negative tokens ({p}, {o}); counts are >= 0"
                raise PlanError(msg)
        out.append(sum(cost.seconds(p, o) for p, o in group) / concurrency)
    return tuple(out)


def _check_costs(gpu: Sequence[float], local: Sequence[float], deadline: float) -> None:
    if len(gpu) != len(local) or not gpu:
        msg = f"got {len(gpu)} GPU costs and {len(local)} local costs; give one of each per group"
        raise PlanError(msg)
    if any(not math.isfinite(c) or c < 0 for c in (*gpu, *local)):
        msg = "group costs must be finite and >= 0; check the worker profiles (RowCost)"
        raise PlanError(msg)
    if not (math.isfinite(deadline) and deadline > 0):
        msg = f"deadline must be a positive number of seconds, got {deadline!r}"
        raise PlanError(msg)


def resolution_for(horizon: float, max_buckets: int = DEFAULT_MAX_BUCKETS) -> float:
    """Bucket width (seconds): a whole number of microseconds, ``horizon / max_buckets`` or more."""
    if max_buckets < 1:
        msg = f"max_buckets must be >= 1, got {max_buckets}"
        raise ConfigError(msg)
    return max(1, math.ceil(round(horizon * 1e6, 6) / max_buckets)) * 1e-6


def units_up(seconds: float, resolution: float) -> int:
    """``seconds`` in buckets, rounded up (a hair of float noise is not a bucket)."""
    q = seconds / resolution
    n = round(q)
    return n if abs(q - n) <= TOLERANCE * max(1.0, q) else math.ceil(q)


def min_cost_choices(
    options: Sequence[Sequence[tuple[int, float]]], capacity: int
) -> list[tuple[int, float, tuple[int, ...]]]:
    """Multiple-choice knapsack: pick one ``(weight_units, cost)`` option per item.

    Returns the Pareto front ``(total_weight, total_cost, choice per item)`` over all picks
    whose total weight is <= ``capacity``, by rising weight and falling cost; empty when none
    fits. Dominated partial states are dropped, so the work is O(items x options x capacity).

    >>> min_cost_choices([[(0, 5.0), (2, 1.0)], [(0, 3.0), (1, 0.0)]], 2)
    [(0, 8.0, (0, 0)), (1, 5.0, (0, 1)), (2, 4.0, (1, 0))]
    """
    front: list[tuple[int, float]] = [(0, 0.0)]
    stages: list[dict[int, tuple[float, int, int]]] = []
    for opts in options:
        best: dict[int, tuple[float, int, int]] = {}
        for weight, cost in front:
            for j, (w, c) in enumerate(opts):
                nw, nc = weight + w, cost + c
                if nw <= capacity and (nw not in best or nc < best[nw][0]):
                    best[nw] = (nc, weight, j)
        kept = _pareto(best)
        stages.append(kept)
        front = [(w, v[0]) for w, v in kept.items()]
        if not front:
            return []
    return [(weight, cost, _picks(stages, weight)) for weight, cost in front]


def _pareto(best: dict[int, tuple[float, int, int]]) -> dict[int, tuple[float, int, int]]:
    """The states not dominated by one with less weight and no more cost."""
    kept: dict[int, tuple[float, int, int]] = {}
    lowest = math.inf
    for w in sorted(best):
        if best[w][0] < lowest:
            lowest = best[w][0]
            kept[w] = best[w]
    return kept


def _picks(stages: list[dict[int, tuple[float, int, int]]], weight: int) -> tuple[int, ...]:
    """Walk the back-pointers from a final state to the option chosen per item."""
    picks: list[int] = []
    for stage in reversed(stages):
        _, weight, j = stage[weight]
        picks.append(j)
    return tuple(reversed(picks))


def _placement(
    local: tuple[int, ...], gpu: Sequence[float], loc: Sequence[float], deadline: float, method: str
) -> Placement:
    chosen = set(local)
    g = math.fsum(c for i, c in enumerate(gpu) if i not in chosen)
    lt = math.fsum(loc[i] for i in local)
    ok = g <= deadline * (1 + TOLERANCE) and lt <= deadline * (1 + TOLERANCE)
    return Placement(tuple(sorted(local)), g, lt, deadline, ok, method)


def greedy_costs(gpu: Sequence[float], local: Sequence[float], deadline: float) -> Placement:
    """The baseline on per-group costs: move groups to local by GPU-seconds saved per local
    second (best first) until the next one would make the local side miss the deadline.
    """
    _check_costs(gpu, local, deadline)
    order = sorted(
        range(len(gpu)), key=lambda i: -(gpu[i] / local[i]) if local[i] > 0 else -math.inf
    )
    chosen: list[int] = []
    used = 0.0
    for i in order:
        if used + local[i] > deadline * (1 + TOLERANCE):
            break
        chosen.append(i)
        used += local[i]
    return _placement(tuple(chosen), gpu, local, deadline, "greedy")


def _best_effort(
    gpu: Sequence[float], local: Sequence[float], deadline: float, max_buckets: int
) -> Placement:
    horizon = math.fsum(local)
    if horizon == 0:
        return _placement(tuple(range(len(gpu))), gpu, local, deadline, "best-effort")
    res = resolution_for(horizon, max_buckets)
    units = [units_up(c, res) for c in local]
    front = min_cost_choices(
        [[(0, g), (u, 0.0)] for g, u in zip(gpu, units, strict=True)], sum(units)
    )
    best = min(front, key=lambda s: max(s[0] * res, s[1]))
    picks = tuple(i for i, j in enumerate(best[2]) if j == 1)
    return _placement(picks, gpu, local, deadline, "best-effort")


def place_costs_dp(
    gpu: Sequence[float],
    local: Sequence[float],
    deadline: float,
    *,
    max_buckets: int = DEFAULT_MAX_BUCKETS,
) -> Placement:
    """:func:`place_rows_dp` on per-group costs (seconds on each side)."""
    _check_costs(gpu, local, deadline)
    greedy = greedy_costs(gpu, local, deadline)
    res = resolution_for(deadline, max_buckets)
    capacity = math.floor(deadline / res + TOLERANCE)
    options = [[(0, g), (units_up(c, res), 0.0)] for g, c in zip(gpu, local, strict=True)]
    front = min_cost_choices(options, capacity)
    dp = None
    if front:
        _, _, picks = min(front, key=lambda s: s[1])
        dp = _placement(tuple(i for i, j in enumerate(picks) if j == 1), gpu, local, deadline, "dp")
    if (
        dp is not None
        and dp.feasible
        and (not greedy.feasible or dp.gpu_seconds <= greedy.gpu_seconds)
    ):
        return dp
    if greedy.feasible:
        return greedy
    return _best_effort(gpu, local, deadline, max_buckets)


def place_rows_dp(
    groups: Sequence[Group],
    *,
    gpu: RowCost,
    local: RowCost,
    deadline: float,
    gpu_concurrency: int = 1,
    local_concurrency: int = 1,
    max_buckets: int = DEFAULT_MAX_BUCKETS,
) -> Placement:
    """Least GPU-seconds with both sides done by ``deadline`` (seconds); see the module doc.

    Infeasible deadlines give ``feasible=False`` and the split with the least makespan
    (``method="best-effort"``), whose :attr:`Placement.makespan` is the expected finish.
    """
    return place_costs_dp(
        group_seconds(groups, gpu, gpu_concurrency),
        group_seconds(groups, local, local_concurrency),
        deadline,
        max_buckets=max_buckets,
    )


def place_rows_greedy(
    groups: Sequence[Group],
    *,
    gpu: RowCost,
    local: RowCost,
    deadline: float,
    gpu_concurrency: int = 1,
    local_concurrency: int = 1,
) -> Placement:
    """The issue's greedy baseline (see :func:`greedy_costs`); no best-effort fallback."""
    return greedy_costs(
        group_seconds(groups, gpu, gpu_concurrency),
        group_seconds(groups, local, local_concurrency),
        deadline,
    )
