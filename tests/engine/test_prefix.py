"""Shared-prefix planning (pure Python, no model)."""

from __future__ import annotations

from llmsql.engine.prefix import (
    PrefixGroup,
    cached_counts,
    chunks,
    common_prefix_len,
    plan_prefix_groups,
)


def test_common_prefix_len() -> None:
    assert common_prefix_len([1, 2, 3], [1, 2, 3]) == 3
    assert common_prefix_len([], [1]) == 0


def test_groups_keep_the_long_shared_prefix() -> None:
    header, a, b = list(range(10)), list(range(50, 58)), list(range(60, 68))
    seqs = [[*header, *a, 1], [*header, *a, 2], [*header, *b, 1], [*header, *b, 2]]
    # two groups save 18 + 18 tokens; one group of four would save only 3 * 10
    assert plan_prefix_groups(seqs, min_prefix=4) == [PrefixGroup(0, 2, 18), PrefixGroup(2, 4, 18)]
    # with shorter specific parts, one group of four saves more (3 * 10 > 13 + 13)
    short = [[*header, *a[:3], 1], [*header, *a[:3], 2], [*header, *b[:3], 1], [*header, *b[:3], 2]]
    assert plan_prefix_groups(short, min_prefix=4) == [PrefixGroup(0, 4, 10)]


def test_groups_prefer_one_group_when_only_the_header_is_shared() -> None:
    header = list(range(10))
    seqs = [[*header, 100 + i, 7] for i in range(5)]
    assert plan_prefix_groups(seqs, min_prefix=4) == [PrefixGroup(0, 5, 10)]


def test_groups_leave_each_member_a_token_of_its_own() -> None:
    same = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert plan_prefix_groups([same, same], min_prefix=4) == [PrefixGroup(0, 2, 8)]


def test_groups_of_unrelated_prompts_are_singletons() -> None:
    seqs = [[1, 2], [3, 4], [5, 6]]
    assert [g.prefix_len for g in plan_prefix_groups(seqs)] == [0, 0, 0]
    assert plan_prefix_groups([]) == []


def test_the_first_member_in_input_order_pays_for_the_prefix() -> None:
    groups = [PrefixGroup(0, 3, 5), PrefixGroup(3, 4, 0)]
    assert cached_counts([7, 1, 4, 0], groups) == [5, 0, 5, 0]


def test_chunks_respect_the_budget_but_never_run_empty() -> None:
    assert list(chunks([3, 3, 9, 1], lambda x: x, 6)) == [[3, 3], [9], [1]]
    assert list(chunks([], lambda x: x, 6)) == []
