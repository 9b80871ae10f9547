from __future__ import annotations

import pytest

from llmsql.errors import PlanError, UnsupportedError
from llmsql.parse import parse
from llmsql.plan import QueryPlan
from llmsql.planner import plan_query
from llmsql.udfs import CallKind


def plan(sql: str) -> QueryPlan:
    return plan_query(sql, parse(sql)[0])


def test_where_conjuncts_run_cheap_first_and_chain() -> None:
    p = plan(
        "SELECT id FROM t WHERE LLM_FILTER('a?', x) AND stars > 3 AND LLM_FILTER('b?', y)"
    )
    first, second = p.calls
    assert first.kind is CallKind.FILTER and second.kind is CallKind.FILTER
    # the cheap predicate is in both input queries; the second sees only rows passing the first
    assert "stars > 3" in first.input.sql()
    assert first.lookup not in first.input.sql()
    assert first.lookup in second.input.sql()
    assert "LLM_FILTER" not in p.final.sql()


def test_select_calls_see_rows_passing_llm_filters() -> None:
    p = plan("SELECT LLM('s', x) AS s FROM t WHERE LLM_FILTER('a?', x)")
    assert [c.kind for c in p.calls] == [CallKind.FILTER, CallKind.MAP]
    assert p.calls[0].lookup in p.calls[1].input.sql()


def test_same_call_twice_in_a_scope_is_planned_once() -> None:
    p = plan(
        "SELECT LLM_CLASSIFY('c', labels => ['a', 'b'], x) AS c, COUNT(*) FROM t "
        "GROUP BY LLM_CLASSIFY('c', labels => ['a', 'b'], x)"
    )
    assert len(p.calls) == 1


def test_nested_calls_plan_inner_first() -> None:
    p = plan("SELECT LLM('outer', LLM('inner', x)) FROM t")
    assert [c.template.instruction for c in p.calls] == ["inner", "outer"]
    assert p.calls[0].lookup in p.calls[1].input.sql()


def test_cte_is_planned_before_the_body_that_reads_it() -> None:
    p = plan(
        "WITH a AS (SELECT id, LLM('s', x) AS s FROM t) "
        "SELECT id FROM a WHERE LLM_FILTER('f', s)"
    )
    assert [c.kind for c in p.calls] == [CallKind.MAP, CallKind.FILTER]
    assert p.calls[1].input.sql().startswith("WITH a AS")


def test_merge_subqueries_hazard_does_not_duplicate_calls() -> None:
    # sqlglot's merge_subqueries would rewrite this into two LLM calls per row (STYLE.md 7.3)
    p = plan("SELECT s, UPPER(s) AS u FROM (SELECT LLM('x', review) AS s FROM reviews) AS t")
    assert len(p.calls) == 1
    assert p.final.sql().count(p.calls[0].lookup) == 1


def test_agg_uses_group_keys_and_all_rows() -> None:
    p = plan("SELECT g, LLM_AGG('sum', review) FROM t WHERE x > 1 GROUP BY 1")
    (call,) = p.calls
    assert call.kind is CallKind.AGG
    assert [k.sql() for k in call.group_keys] == ["g"]
    assert "DISTINCT" not in call.input.sql()
    assert "x > 1" in call.input.sql()


def test_placeholder_fields_are_added_and_fix_the_order() -> None:
    (call,) = plan("SELECT LLM('Rate {title}: ', review) FROM t").calls
    assert call.template.fields == ("review", "title")
    assert call.template.order_is_fixed


def test_limit_without_order_bounds_the_llm_inputs() -> None:
    (call,) = plan("SELECT LLM('s', x) FROM t WHERE y > 1 LIMIT 5").calls
    assert "LIMIT 5" in call.input.sql()


def test_limit_with_order_does_not_bound_the_inputs() -> None:
    (call,) = plan("SELECT LLM('s', x) FROM t ORDER BY y LIMIT 5").calls
    assert "LIMIT" not in call.input.sql()


def test_inner_join_on_llm_condition_moves_to_where() -> None:
    p = plan("SELECT a.id FROM a JOIN b ON a.k = b.k AND LLM_FILTER('m?', a.x, b.y)")
    (call,) = p.calls
    assert "a.k = b.k" in call.input.sql()


def test_outer_join_on_llm_condition_is_unsupported_with_advice() -> None:
    with pytest.raises(UnsupportedError, match="subquery or CTE"):
        plan("SELECT a.id FROM a LEFT JOIN b ON LLM_FILTER('m?', a.x, b.y)")


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("SELECT LLM(x) FROM t", "string literal"),
        ("SELECT LLM('i', x, nope => 1) FROM t", "unknown option 'nope'"),
        ("SELECT LLM('i', x, max_tokens => 0) FROM t", "positive integer"),
        ("SELECT LLM('i', x, max_tokens => 'a') FROM t", "positive integer"),
        ("SELECT LLM('i', x, temperature => -1) FROM t", "temperature"),
        ("SELECT LLM_CLASSIFY('i', x) FROM t", "needs labels"),
        ("SELECT LLM_CLASSIFY('i', labels => ['a'], x) FROM t", "at least two"),
        ("SELECT LLM_CLASSIFY('i', labels => ['a', 'A'], x) FROM t", "distinct"),
        ("SELECT LLM_CLASSIFY('i', labels => [x, 'b'], x) FROM t", "constant"),
        ("SELECT LLM_EXTRACT('i', x) FROM t", "needs schema"),
        ("SELECT LLM_EXTRACT('i', schema => 'a', x) FROM t", "malformed"),
        ("SELECT LLM_EXTRACT('i', schema => 'a BLOB', x) FROM t", "unsupported type"),
        ("SELECT LLM_EXTRACT('i', schema => 'a INT, a INT', x) FROM t", "twice"),
        ("SELECT LLM('i', labels => ['a', 'b'], x) FROM t", "belongs to LLM_CLASSIFY"),
        ("SELECT LLM('i', x, x) FROM t", "two fields named 'x'"),
        ("SELECT LLM('i', *) FROM t", "does not take"),
        ("SELECT LLM('i', x, model => 'a', model => 'b') FROM t", "twice"),
    ],
)
def test_bad_calls_get_clear_errors_with_position(sql: str, message: str) -> None:
    with pytest.raises(PlanError, match=message) as info:
        plan(sql)
    assert info.value.line == 1


def test_plan_explain_is_stable_text() -> None:
    text = plan("SELECT id FROM t WHERE LLM_FILTER('ok?', review)").explain()
    assert text.splitlines()[1] == "  LLMCall q_1: LLM_FILTER in WHERE [review]"
