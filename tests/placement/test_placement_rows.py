"""Row placement: the DP against brute force and the greedy baseline; bad input."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence

import pytest

from llmsql.errors import ConfigError, PlanError
from llmsql.placement import (
    RowCost,
    greedy_costs,
    group_seconds,
    place_costs_dp,
    place_rows_dp,
    place_rows_greedy,
)

EXACT = 10**7  # buckets: 1 us resolution for deadlines up to 10 s


def brute_force(
    gpu: Sequence[float], local: Sequence[float], deadline: float
) -> tuple[float | None, float]:
    """(least GPU-seconds over feasible placements or None, least makespan over all)."""
    best, makespan = None, math.inf
    for mask in itertools.product((False, True), repeat=len(gpu)):
        g = math.fsum(c for c, m in zip(gpu, mask, strict=True) if not m)
        lt = math.fsum(c for c, m in zip(local, mask, strict=True) if m)
        makespan = min(makespan, max(g, lt))
        if g <= deadline + 1e-12 and lt <= deadline + 1e-12:
            best = g if best is None else min(best, g)
    return best, makespan


def _instance(rng: random.Random, n: int) -> tuple[list[float], list[float], float]:
    gpu = [rng.randint(1_000, 300_000) * 1e-6 for _ in range(n)]
    local = [rng.randint(1_000, 3_000_000) * 1e-6 for _ in range(n)]
    span = (sum(gpu), sum(local))
    deadline = rng.randint(50_000, int(max(span) * 1e6)) * 1e-6
    return gpu, local, deadline


def test_dp_equals_brute_force_on_small_instances() -> None:
    rng = random.Random(1234)
    feasible_seen = infeasible_seen = 0
    for _ in range(300):
        gpu, local, deadline = _instance(rng, rng.randint(1, 10))
        best, makespan = brute_force(gpu, local, deadline)
        plan = place_costs_dp(gpu, local, deadline, max_buckets=EXACT)
        assert plan.feasible == (best is not None)
        if best is not None:
            feasible_seen += 1
            assert plan.gpu_seconds == pytest.approx(best, abs=1e-9)
            assert plan.local_seconds <= deadline + 1e-9
            assert plan.gpu_seconds <= deadline + 1e-9
        else:
            infeasible_seen += 1
            assert plan.method == "best-effort"
            assert plan.makespan == pytest.approx(makespan, abs=1e-9)
            assert plan.makespan > deadline
    assert feasible_seen > 50 and infeasible_seen > 20


def test_coarse_buckets_stay_truly_feasible_and_near_optimal() -> None:
    rng = random.Random(99)
    for _ in range(200):
        n = rng.randint(1, 10)
        gpu = [rng.uniform(0.001, 0.3) for _ in range(n)]
        local = [rng.uniform(0.001, 3.0) for _ in range(n)]
        deadline = rng.uniform(0.05, max(sum(gpu), sum(local)))
        plan = place_costs_dp(gpu, local, deadline, max_buckets=64)
        best, _ = brute_force(gpu, local, deadline)
        if plan.feasible:  # rounding up never hides a miss
            assert plan.local_seconds <= deadline + 1e-12
            assert plan.gpu_seconds <= deadline + 1e-12
            assert best is not None and plan.gpu_seconds >= best - 1e-12
        res = math.ceil(deadline * 1e6 / 64) * 1e-6
        # with one bucket of slack per group, a placement that exists is found
        slack_best, _ = (
            brute_force(gpu, local, deadline - n * res) if deadline > n * res else (None, 0)
        )
        if slack_best is not None:
            assert plan.feasible
            assert plan.gpu_seconds <= slack_best + 1e-12


def test_never_worse_than_greedy_on_larger_instances() -> None:
    rng = random.Random(5)
    strictly_better = 0
    for _ in range(8):
        gpu = [rng.uniform(0.01, 1.0) for _ in range(120)]
        local = [g * rng.uniform(3, 30) for g in gpu]
        deadline = rng.uniform(0.3, 0.9) * sum(gpu)
        plan = place_costs_dp(gpu, local, deadline)
        greedy = greedy_costs(gpu, local, deadline)
        assert plan.feasible or not greedy.feasible
        if greedy.feasible:
            assert plan.gpu_seconds <= greedy.gpu_seconds + 1e-12
            strictly_better += plan.gpu_seconds < greedy.gpu_seconds - 1e-9
        if plan.feasible:
            assert plan.local_seconds <= deadline and plan.gpu_seconds <= deadline
    assert strictly_better >= 1


def test_greedy_follows_ratio_and_stops_at_the_first_misfit() -> None:
    gpu = [1.0, 1.0, 1.0]
    local = [2.0, 5.0, 1.0]  # ratios 0.5, 0.2, 1.0 -> order 2, 0, 1
    plan = greedy_costs(gpu, local, deadline=4.0)
    assert plan.local_groups == (0, 2)
    assert plan.gpu_seconds == 1.0 and plan.local_seconds == 3.0
    assert plan.feasible and plan.method == "greedy"


def test_row_api_groups_concurrency_and_dp_beats_greedy() -> None:
    gpu_cost, local_cost = RowCost(0.0, 0.001, 0.01), RowCost(0.0, 0.01, 0.1)
    groups = [((100, 5),), ((400, 5), (50, 5)), ((200, 5),)]
    assert group_seconds(groups, gpu_cost) == pytest.approx((0.15, 0.55, 0.25))
    assert group_seconds(groups, gpu_cost, 5) == pytest.approx((0.03, 0.11, 0.05))
    dp = place_rows_dp(groups, gpu=gpu_cost, local=local_cost, deadline=6.0)
    greedy = place_rows_greedy(groups, gpu=gpu_cost, local=local_cost, deadline=6.0)
    assert dp.local_groups == (1,) and dp.method == "dp"
    assert dp.gpu_seconds == pytest.approx(0.4)
    assert greedy.gpu_seconds == pytest.approx(0.8)
    # two local workers halve the local time: groups 1 and 2 fill the deadline exactly,
    # which 1 us buckets see and the default ~1 ms buckets (rounded up) do not
    kw = {"gpu": gpu_cost, "local": local_cost, "deadline": 4.0, "local_concurrency": 2}
    both = place_rows_dp(groups, **kw, max_buckets=EXACT)
    assert both.local_groups == (1, 2) and both.gpu_seconds == pytest.approx(0.15)
    coarse = place_rows_dp(groups, **kw)
    assert coarse.local_groups == (0, 1) and coarse.local_seconds <= 4.0


def test_infeasible_is_flagged_with_the_expected_finish() -> None:
    plan = place_costs_dp([4.0, 4.0, 4.0], [6.0, 6.0, 6.0], deadline=5.0)
    assert not plan.feasible and plan.method == "best-effort"
    assert plan.makespan == pytest.approx(8.0)  # two on the GPU, one local
    assert len(plan.local_groups) == 1


def test_bad_input() -> None:
    with pytest.raises(PlanError, match="no groups"):
        place_rows_dp([], gpu=RowCost(0, 0, 0), local=RowCost(0, 0, 0), deadline=1.0)
    with pytest.raises(PlanError, match="group 1 has no rows"):
        place_rows_dp([((1, 1),), ()], gpu=RowCost(0, 0, 0), local=RowCost(0, 0, 0), deadline=1.0)
    with pytest.raises(PlanError, match="negative tokens"):
        place_rows_dp([((-1, 1),)], gpu=RowCost(0, 0, 0), local=RowCost(0, 0, 0), deadline=1.0)
    with pytest.raises(PlanError, match="finite and >= 0"):
        place_costs_dp([1.0], [-1.0], 1.0)
    with pytest.raises(PlanError, match="one of each"):
        place_costs_dp([1.0, 2.0], [1.0], 1.0)
    with pytest.raises(PlanError, match="positive number"):
        place_costs_dp([1.0], [1.0], 0.0)
    with pytest.raises(ConfigError, match="concurrency"):
        group_seconds([((1, 1),)], RowCost(0, 0, 0), 0)
    with pytest.raises(ConfigError, match="max_buckets"):
        place_costs_dp([1.0], [1.0], 1.0, max_buckets=0)
