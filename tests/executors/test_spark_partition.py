"""Prefix-affinity partitioning as a pure function: groups stay whole, tokens are balanced."""

from __future__ import annotations

import math
import random

import pytest

from llmsql.errors import PlanError
from llmsql.executors.spark.partition import (
    Group,
    PartitionPlan,
    describe,
    field_priority,
    plan_partitions,
)


def skewed_groups(seed: int = 0, n: int = 40) -> list[Group]:
    rng = random.Random(seed)
    return [Group((f"movie{i}",), tokens=rng.randint(50, 900), rows=rng.randint(1, 30))
            for i in range(n)]


def placed_keys(plan: PartitionPlan) -> set[tuple[object, ...]]:
    return {k for k, _ in plan.assignment} | {s.key for s in plan.splits}


def test_every_group_lands_whole_in_one_partition() -> None:
    groups = skewed_groups()
    plan = plan_partitions(groups, 4)
    assert placed_keys(plan) == {g.key for g in groups}
    assert plan.splits == ()  # no group is heavier than a quarter of the total
    assert all(0 <= p < 4 for _, p in plan.assignment)
    assert len({k for k, _ in plan.assignment}) == len(groups)


def test_partitions_are_balanced_by_tokens_not_rows() -> None:
    # Many rows of short prompts in one group, few rows of long prompts in the others.
    groups = [Group(("short",), tokens=400, rows=200)] + [
        Group((f"long{i}",), tokens=400, rows=4) for i in range(3)
    ]
    plan = plan_partitions(groups, 4)
    assert plan.tokens == (400, 400, 400, 400)
    assert max(plan.rows) / min(plan.rows) == 50  # rows are deliberately not balanced


def test_balance_is_close_to_the_lower_bound_on_skewed_groups() -> None:
    for seed in range(5):
        groups = skewed_groups(seed)
        plan = plan_partitions(groups, 4)
        total = sum(g.tokens for g in groups)
        assert sum(plan.tokens) == total
        bound = max(total / 4, max(g.tokens for g in groups))
        assert max(plan.tokens) <= bound * 4 / 3 + 1  # LPT's guarantee


def test_a_group_too_heavy_for_one_partition_is_split_and_reported() -> None:
    groups = [Group(("huge",), tokens=3000, rows=100)] + [
        Group((f"g{i}",), tokens=100, rows=3) for i in range(10)
    ]
    plan = plan_partitions(groups, 4)
    (split,) = plan.splits
    assert split.key == ("huge",)
    target = sum(g.tokens for g in groups) / 4
    assert len(split.partitions) == math.ceil(3000 / target)
    assert plan.partition_of(("huge",)) is None
    assert placed_keys(plan) == {g.key for g in groups}
    text = describe(plan, "synopsis", groups=len(groups), split_by={("huge",): "review"})
    assert text[0].startswith("affinity partitioning on synopsis: 11 prefix group(s) -> 4")
    assert text[1].startswith("split: synopsis='huge' (3,000 est. tokens) cut by review")


def test_unsplittable_groups_stay_whole_even_when_heavy() -> None:
    groups = [Group(("one row",), tokens=5000, rows=1),
              Group(("agg group",), tokens=5000, rows=50, splittable=False),
              Group(("small",), tokens=10, rows=2)]
    plan = plan_partitions(groups, 4)
    assert plan.splits == ()
    assert plan.partition_of(("one row",)) != plan.partition_of(("agg group",))


def test_more_partitions_than_groups_and_empty_input() -> None:
    plan = plan_partitions([Group(("a",), 10)], 3)
    assert plan.tokens == (10, 0, 0) and plan.n_partitions == 3
    empty = plan_partitions([], 2)
    assert empty.assignment == () and empty.tokens == (0, 0) and empty.imbalance == 1.0


def test_plan_is_deterministic() -> None:
    groups = skewed_groups(3)
    assert plan_partitions(groups, 5) == plan_partitions(list(groups), 5)


def test_bad_arguments_are_plan_errors() -> None:
    with pytest.raises(PlanError, match="at least one partition"):
        plan_partitions([Group(("a",), 1)], 0)
    with pytest.raises(PlanError, match="negative"):
        plan_partitions([Group(("a",), -1)], 1)


def test_field_priority_matches_the_optimizer_ranking() -> None:
    assert field_priority([0, 0]) == (0, 1)
    assert field_priority([5, 7, 7]) == (1, 2, 0)
