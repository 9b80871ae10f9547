"""Layer placement (SplitLLM's split): per length class, the first ``k`` layers run locally.

For a :class:`LengthClass` (``rows`` prompts of ``prompt_tokens`` each, answers of
``output_tokens``) and a split ``k`` in ``0..N``: the local side runs layers ``[0, k)``, ships
the hidden states (``tokens x activation_bytes_per_token`` bytes, one message per row and per
generated token) over the :class:`~llmsql.placement.profile.Link`, and the GPU runs layers
``[k, N)`` plus the head. ``k = 0`` is all-GPU (nothing shipped). Tokens processed per row are
``prompt_tokens + output_tokens - 1`` (each generated token crosses the boundary again, so this
suits short answers).

:func:`best_split` picks ``k`` per class minimising GPU-seconds with local time + transfers <=
deadline and GPU time <= deadline: a multiple-choice knapsack over classes x local-time buckets
(same resolution and round-UP rule as :mod:`llmsql.placement.rows`). It also runs
:func:`greedy_split` (per class the ``k`` with the least GPU time whose local time fits the
class's fair share of the deadline, by tokens) and keeps the better, so it is never worse.

>>> from llmsql.placement.profile import LayerProfile, Link
>>> local = LayerProfile((0.01,) * 4, 0.01, 100)
>>> gpu = LayerProfile((0.001,) * 4, 0.001, 100)
>>> plan = best_split([LengthClass(10, 10)], local, gpu, Link(1e6, 0.0), deadline=2.5)
>>> plan.splits, round(plan.gpu_seconds, 6), plan.feasible
((2,), 0.3, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmsql.errors import ConfigError, PlanError
from llmsql.placement.rows import (
    DEFAULT_MAX_BUCKETS,
    TOLERANCE,
    min_cost_choices,
    resolution_for,
    units_up,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from llmsql.placement.profile import LayerProfile, Link


@dataclass(frozen=True)
class LengthClass:
    """``rows`` prompts of about ``prompt_tokens`` tokens each, answering ``output_tokens``."""

    prompt_tokens: int
    rows: int
    output_tokens: int = 1

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.rows < 1 or self.output_tokens < 1:
            msg = f"length class needs prompt_tokens, rows and output_tokens >= 1, got {self}"
            raise PlanError(msg)

    @property
    def tokens(self) -> int:
        """Tokens pushed through the layers for the whole class."""
        return self.rows * (self.prompt_tokens + self.output_tokens - 1)


@dataclass(frozen=True)
class SplitCost:
    """One class at one split ``k``: local seconds (with transfers) and GPU seconds."""

    k: int
    local_seconds: float
    gpu_seconds: float


@dataclass(frozen=True)
class LayerPlan:
    """The split per class and its predicted cost (fields as in ``rows.Placement``)."""

    splits: tuple[int, ...]
    gpu_seconds: float
    local_seconds: float
    deadline: float
    feasible: bool
    method: str

    @property
    def makespan(self) -> float:
        """When the later side finishes (seconds from the start)."""
        return max(self.gpu_seconds, self.local_seconds)


def split_costs(
    cls: LengthClass, local: LayerProfile, gpu: LayerProfile, link: Link
) -> tuple[SplitCost, ...]:
    """Costs of every split ``k = 0..N`` for one class."""
    if local.num_layers != gpu.num_layers:
        msg = (
            f"local profile has {local.num_layers} layers, GPU profile {gpu.num_layers}; both "
            "sides must run the same model (re-profile them with the same model)"
        )
        raise ConfigError(msg)
    if local.activation_bytes_per_token != gpu.activation_bytes_per_token:
        msg = (
            "local and GPU profiles disagree on activation bytes per token "
            f"({local.activation_bytes_per_token} vs {gpu.activation_bytes_per_token}); "
            "both sides must use the same hidden size and dtype"
        )
        raise ConfigError(msg)
    n, tokens = gpu.num_layers, cls.tokens
    out = []
    for k in range(n + 1):
        ship = 0.0
        if k > 0:
            ship = link.transfer_seconds(
                tokens * local.activation_bytes_per_token, messages=cls.rows * cls.output_tokens
            )
        out.append(
            SplitCost(
                k,
                local.seconds_for(0, k, tokens=tokens) + ship,
                gpu.seconds_for(k, n, tokens=tokens, head=True),
            )
        )
    return tuple(out)


def _plan(
    splits: Sequence[int], table: Sequence[Sequence[SplitCost]], deadline: float, method: str
) -> LayerPlan:
    g = math.fsum(table[i][k].gpu_seconds for i, k in enumerate(splits))
    lt = math.fsum(table[i][k].local_seconds for i, k in enumerate(splits))
    ok = g <= deadline * (1 + TOLERANCE) and lt <= deadline * (1 + TOLERANCE)
    return LayerPlan(tuple(splits), g, lt, deadline, ok, method)


def _check(classes: Sequence[LengthClass], deadline: float) -> None:
    if not classes:
        msg = "layer placement got no length classes; there is nothing to place"
        raise PlanError(msg)
    if not (math.isfinite(deadline) and deadline > 0):
        msg = f"deadline must be a positive number of seconds, got {deadline!r}"
        raise PlanError(msg)


def greedy_split(
    classes: Sequence[LengthClass],
    local: LayerProfile,
    gpu: LayerProfile,
    link: Link,
    deadline: float,
) -> LayerPlan:
    """SplitLLM's greedy baseline: per class, the ``k`` with the least GPU time whose local
    time fits the class's fair share of the deadline (``deadline x class tokens / all tokens``).
    """
    _check(classes, deadline)
    table = [split_costs(c, local, gpu, link) for c in classes]
    total = sum(c.tokens for c in classes)
    splits = []
    for cls, costs in zip(classes, table, strict=True):
        share = deadline * cls.tokens / total
        fits = [s for s in costs if s.local_seconds <= share * (1 + TOLERANCE)]
        splits.append(min(fits, key=lambda s: (s.gpu_seconds, s.k)).k)
    return _plan(splits, table, deadline, "greedy")


def best_split(
    classes: Sequence[LengthClass],
    local: LayerProfile,
    gpu: LayerProfile,
    link: Link,
    deadline: float,
    *,
    max_buckets: int = DEFAULT_MAX_BUCKETS,
) -> LayerPlan:
    """``k`` per class with the least GPU-seconds such that both sides finish by ``deadline``.

    Infeasible deadlines give ``feasible=False`` and the splits with the least makespan found
    (``method="best-effort"``).
    """
    _check(classes, deadline)
    table = [split_costs(c, local, gpu, link) for c in classes]
    greedy = greedy_split(classes, local, gpu, link, deadline)
    res = resolution_for(deadline, max_buckets)
    capacity = math.floor(deadline / res + TOLERANCE)
    options = [[(units_up(s.local_seconds, res), s.gpu_seconds) for s in costs] for costs in table]
    front = min_cost_choices(options, capacity)
    if front:
        dp = _plan(min(front, key=lambda s: s[1])[2], table, deadline, "dp")
        if dp.feasible and (not greedy.feasible or dp.gpu_seconds <= greedy.gpu_seconds):
            return dp
    if greedy.feasible:
        return greedy
    horizon = math.fsum(max(s.local_seconds for s in costs) for costs in table)
    if horizon == 0:
        return _plan([len(costs) - 1 for costs in table], table, deadline, "best-effort")
    res = resolution_for(horizon, max_buckets)
    options = [[(units_up(s.local_seconds, res), s.gpu_seconds) for s in costs] for costs in table]
    front = min_cost_choices(options, sum(max(w for w, _ in o) for o in options))
    best = min(front, key=lambda s: max(s[0] * res, s[1]))
    return _plan(best[2], table, deadline, "best-effort")
