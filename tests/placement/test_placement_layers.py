"""Layer placement: the per-class split DP against brute force and the greedy split."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from llmsql.errors import ConfigError, PlanError
from llmsql.placement import (
    LayerProfile,
    LengthClass,
    Link,
    best_split,
    greedy_split,
    split_costs,
)

EXACT = 10**8  # 1 us buckets for deadlines up to 100 s


def _brute(classes, local, gpu, link, deadline):  # type: ignore[no-untyped-def]
    table = [split_costs(c, local, gpu, link) for c in classes]
    best, makespan = None, math.inf
    for ks in itertools.product(*(range(len(t)) for t in table)):
        g = math.fsum(t[k].gpu_seconds for t, k in zip(table, ks, strict=True))
        lt = math.fsum(t[k].local_seconds for t, k in zip(table, ks, strict=True))
        makespan = min(makespan, max(g, lt))
        if g <= deadline + 1e-9 and lt <= deadline + 1e-9:
            best = g if best is None else min(best, g)
    return best, makespan


def _instance(rng: random.Random):  # type: ignore[no-untyped-def]
    n = rng.randint(1, 4)
    local = LayerProfile(tuple(rng.randint(5, 60) * 1e-6 for _ in range(n)), 2e-5, 1000)
    gpu = LayerProfile(tuple(rng.randint(1, 6) * 1e-6 for _ in range(n)), 1e-6, 1000)
    link = Link(1e9, rng.randint(0, 200) * 1e-6)  # 1000 B/token -> 1 us per token
    classes = [
        LengthClass(rng.randint(16, 2048), rng.randint(1, 40), rng.randint(1, 3))
        for _ in range(rng.randint(1, 4))
    ]
    all_gpu = sum(split_costs(c, local, gpu, link)[0].gpu_seconds for c in classes)
    deadline = rng.randint(1, 1000) * 1e-3 * all_gpu * 1.2
    return classes, local, gpu, link, round(deadline, 6)


def test_dp_equals_brute_force_on_small_instances() -> None:
    rng = random.Random(2024)
    seen = {True: 0, False: 0}
    for _ in range(250):
        classes, local, gpu, link, deadline = _instance(rng)
        best, makespan = _brute(classes, local, gpu, link, deadline)
        plan = best_split(classes, local, gpu, link, deadline, max_buckets=EXACT)
        assert plan.feasible == (best is not None)
        seen[plan.feasible] += 1
        if best is not None:
            assert plan.gpu_seconds == pytest.approx(best, abs=1e-9)
            assert plan.local_seconds <= deadline + 1e-9
        else:
            assert plan.method == "best-effort"
            assert plan.makespan == pytest.approx(makespan, abs=1e-9)
    assert seen[True] > 30 and seen[False] > 30


def test_never_worse_than_greedy_and_sometimes_better() -> None:
    rng = random.Random(11)
    better = 0
    for _ in range(40):
        n = 24
        local = LayerProfile(tuple(rng.uniform(2e-5, 8e-5) for _ in range(n)), 1e-4, 1792)
        gpu = LayerProfile(tuple(rng.uniform(1e-6, 3e-6) for _ in range(n)), 5e-6, 1792)
        link = Link(rng.uniform(1e8, 1e9), rng.uniform(1e-4, 2e-3))
        classes = [
            LengthClass(rng.choice((64, 256, 1024, 4096)), rng.randint(5, 400)) for _ in range(6)
        ]
        all_gpu = sum(split_costs(c, local, gpu, link)[0].gpu_seconds for c in classes)
        deadline = all_gpu * rng.uniform(0.5, 3.0)
        plan = best_split(classes, local, gpu, link, deadline)
        greedy = greedy_split(classes, local, gpu, link, deadline)
        assert plan.feasible or not greedy.feasible
        if greedy.feasible:
            assert plan.gpu_seconds <= greedy.gpu_seconds + 1e-12
            better += plan.gpu_seconds < greedy.gpu_seconds * (1 - 1e-6)
        if plan.feasible:
            assert plan.local_seconds <= deadline and plan.gpu_seconds <= deadline
    assert better >= 5


def test_split_costs_count_layers_head_and_transfer() -> None:
    local = LayerProfile((0.01, 0.02), 0.05, 100)
    gpu = LayerProfile((0.001, 0.002), 0.004, 100)
    cls = LengthClass(prompt_tokens=10, rows=3, output_tokens=2)  # 33 tokens, 6 messages
    costs = split_costs(cls, local, gpu, Link(bandwidth=3300.0, latency=0.1))
    assert [c.k for c in costs] == [0, 1, 2]
    assert costs[0].local_seconds == 0.0
    assert costs[0].gpu_seconds == pytest.approx(33 * 0.007)
    assert costs[1].local_seconds == pytest.approx(33 * 0.01 + 0.6 + 1.0)
    assert costs[1].gpu_seconds == pytest.approx(33 * 0.006)
    assert costs[2].local_seconds == pytest.approx(33 * 0.03 + 1.6)
    assert costs[2].gpu_seconds == pytest.approx(33 * 0.004)


def test_greedy_uses_fair_shares() -> None:
    local = LayerProfile((1.0, 1.0), 0.0, 0)
    gpu = LayerProfile((0.1, 0.1), 0.1, 0)
    link = Link(1e9, 0.0)
    classes = [LengthClass(1, 1), LengthClass(1, 1)]  # one token each; shares of 2.0 s: 1 s each
    greedy = greedy_split(classes, local, gpu, link, deadline=2.0)
    assert greedy.splits == (1, 1)
    plan = best_split(classes, local, gpu, link, deadline=2.0)
    assert plan.gpu_seconds == pytest.approx(greedy.gpu_seconds)


def test_infeasible_layers_report_the_best_effort_finish() -> None:
    local = LayerProfile((1.0,), 0.0, 0)
    gpu = LayerProfile((1.0,), 1.0, 0)
    plan = best_split([LengthClass(1, 1)] * 3, local, gpu, Link(1e9, 0.0), deadline=2.0)
    assert not plan.feasible and plan.method == "best-effort"
    assert plan.makespan == pytest.approx(3.0)  # GPU head alone is 3 s


def test_bad_input() -> None:
    local = LayerProfile((1.0, 1.0), 0.0, 10)
    with pytest.raises(ConfigError, match="same model"):
        best_split([LengthClass(1, 1)], local, LayerProfile((1.0,), 0.0, 10), Link(1.0, 0.0), 1.0)
    with pytest.raises(ConfigError, match="activation bytes"):
        best_split(
            [LengthClass(1, 1)], local, LayerProfile((1.0, 1.0), 0.0, 20), Link(1.0, 0.0), 1.0
        )
    with pytest.raises(PlanError, match="no length classes"):
        best_split([], local, local, Link(1.0, 0.0), 1.0)
    with pytest.raises(PlanError, match="positive number"):
        best_split([LengthClass(1, 1)], local, local, Link(1.0, 0.0), -1.0)
    with pytest.raises(PlanError, match=">= 1"):
        LengthClass(0, 1)
