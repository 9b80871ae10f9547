"""The Spark SQL rewrites of planned queries (pure sqlglot: no Spark needed)."""

from __future__ import annotations

import sqlglot

from llmsql.executors.spark.sql import (
    as_lookup,
    hash_joinable,
    hoist_nested,
    portable_samples,
    spark_sql,
    wrap_ungrouped,
)
from llmsql.parse import parse
from llmsql.planner import plan_query, sampled


def planned(sql: str):  # type: ignore[no-untyped-def]
    return plan_query(sql, parse(sql)[0], query_id="q")


def test_lookups_are_recognised_with_their_keys() -> None:
    plan = planned("SELECT LLM('Say', movie, review) FROM reviews")
    (ref,) = [r for n in plan.final.walk() if (r := as_lookup(n)) is not None]
    assert ref.table == "__llmsql_q_1"
    assert [(c, e.sql()) for c, e in ref.pairs] == [("__llmsql_a0", "movie"),
                                                    ("__llmsql_a1", "review")]
    assert as_lookup(sqlglot.parse_one("(SELECT x FROM t)")) is None


def test_keys_are_compared_as_one_struct_for_a_hash_join() -> None:
    plan = planned("SELECT id FROM reviews WHERE LLM_FILTER('Good?', genre, review)")
    text = hash_joinable(plan.final.copy()).sql(dialect="spark")
    assert ("WHERE NAMED_STRUCT('k0', __llmsql_r_q_1.__llmsql_a0, 'k1', "
            "__llmsql_r_q_1.__llmsql_a1) = NAMED_STRUCT('k0', genre, 'k1', review)") in text
    assert "IS NOT DISTINCT FROM" not in text


def test_nested_lookups_become_left_joins_of_the_home_select() -> None:
    plan = planned("SELECT id, LLM('a', LLM('b', review)) AS s FROM reviews")
    text = hoist_nested(plan.final.copy()).sql(dialect="spark")
    assert ("LEFT JOIN __llmsql_q_1 AS __llmsql_j1 "
            "ON __llmsql_j1.__llmsql_a0 IS NOT DISTINCT FROM review") in text
    assert "NOT DISTINCT FROM __llmsql_j1.__llmsql_result" in text
    assert text.count("SELECT") == 2  # the outer lookup stays a (now one-level) subquery


def test_select_star_is_qualified_when_a_join_is_added() -> None:
    plan = planned("SELECT * FROM reviews WHERE LLM_FILTER('a', LLM('b', review))")
    text = spark_sql(plan.final)
    assert text.startswith("SELECT reviews.* FROM reviews LEFT JOIN")


def test_lookups_outside_aggregates_of_a_group_by_are_wrapped() -> None:
    plan = planned("SELECT movie, LLM('Describe', movie) AS d, "
                   "SUM(CAST(LLM_FILTER('Good?', review) AS INT)) AS n FROM reviews "
                   "GROUP BY movie")
    text = wrap_ungrouped(plan.final.copy()).sql(dialect="spark")
    assert text.count("ANY_VALUE(") == 1  # the per-movie lookup, not the one inside SUM
    assert "ANY_VALUE((SELECT __llmsql_r_q_2" in text or "ANY_VALUE((SELECT __llmsql_r_q_1" in text


def test_grouped_lookups_are_left_alone() -> None:
    plan = planned("SELECT LLM_CLASSIFY('Kind', labels => ['a', 'b'], review) AS k, COUNT(*) "
                   "FROM reviews GROUP BY k")
    assert "ANY_VALUE" not in wrap_ungrouped(plan.final.copy()).sql(dialect="spark")
    plan = planned("SELECT LLM('Say', review), COUNT(*) FROM reviews GROUP BY 1")
    assert "ANY_VALUE" not in wrap_ungrouped(plan.final.copy()).sql(dialect="spark")


def test_reservoir_samples_become_a_seeded_random_limit() -> None:
    q = sampled(sqlglot.parse_one("SELECT a FROM t"), 64)
    text = portable_samples(q.copy()).sql(dialect="spark")
    assert "TABLESAMPLE" not in text
    assert "ORDER BY RAND(7) LIMIT 64" in text


def test_spark_sql_leaves_the_plan_untouched() -> None:
    plan = planned("SELECT id, LLM('a', LLM('b', review)) FROM reviews")
    before = plan.final.sql()
    spark_sql(plan.final)
    assert plan.final.sql() == before
