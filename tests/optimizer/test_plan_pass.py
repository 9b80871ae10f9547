"""The plan-level pass: order_llm_predicates through optimize_plan, with its sampler seam.

The sampler here is a plain function over a real DuckDB table: it runs the sample call's
input query (the planner's SQL, reservoir sample included) and answers each distinct prompt
with a known rule (TRUE iff a value contains 'Great'; one token per character), so every
selectivity and cost the pass sees is computed from the data.
"""

from __future__ import annotations

from collections.abc import Iterator

import duckdb
import pandas as pd
import pytest
from sqlglot import exp

from llmsql.errors import OptimizerError, PlanError
from llmsql.optimizer import (
    PLAN_PASSES,
    PlanContext,
    PredicateSample,
    optimize_plan,
)
from llmsql.optimizer.order_llm_predicates import SAMPLE_ROWS, order_llm_predicates
from llmsql.parse import parse
from llmsql.plan import LLMCall, QueryPlan
from llmsql.planner import plan_query

TWO_FILTERS = ("SELECT id FROM t WHERE LLM_FILTER('Good?', review) "
               "AND LLM_FILTER('Good?', genre) ORDER BY id")


@pytest.fixture
def con() -> Iterator[duckdb.DuckDBPyConnection]:
    c = duckdb.connect()
    yield c
    c.close()


def table(genre_passes: bool) -> pd.DataFrame:
    # 1 review in 4 passes; genres are short and pass all or none
    return pd.DataFrame({
        "id": range(400),
        "review": [("Great " if i % 4 == 0 else "Meh ") + "x" * 30 + str(i % 200)
                   for i in range(400)],
        "genre": [("Great" if genre_passes else "") + ("crime" if i % 2 else "drama")
                  for i in range(400)],
    })


class DuckSampler:
    """Answers a sample call over DuckDB with the 'Great' rule; records what it was given."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con
        self.calls: list[LLMCall] = []

    def __call__(self, call: LLMCall) -> PredicateSample:
        self.calls.append(call)
        rows = self.con.sql(call.input.sql(dialect="duckdb")).fetchall()
        distinct = set(rows)
        true = sum(1 for r in distinct if any("Great" in str(v) for v in r))
        tokens = sum(len(str(v)) for r in distinct for v in r)
        return PredicateSample(rows=len(rows), distinct=len(distinct), true=true,
                               prompt_tokens=tokens, answered=len(distinct))


def context(sql: str, sampler: DuckSampler, *, reorder: bool = True) -> PlanContext:
    return PlanContext(sql=sql, tree=parse(sql)[0], sample=sampler, query_id="q9",
                       reorder=reorder)


def written(ctx: PlanContext) -> QueryPlan:
    return plan_query(ctx.sql, ctx.tree, query_id=ctx.query_id)


def conjuncts(plan: QueryPlan) -> list[tuple[int, int] | None]:
    return [c.conjunct for c in plan.calls]


def test_cheap_filter_that_drops_everything_runs_first(con: duckdb.DuckDBPyConnection) -> None:
    con.register("t", table(genre_passes=False))
    sampler = DuckSampler(con)
    ctx = context(TWO_FILTERS, sampler)
    plan, trace = optimize_plan(written(ctx), ctx)
    assert [t.rule for t in trace] == ["order_llm_predicates"]
    # one sample per candidate filter, in written order, each over its own sample rows
    assert [c.conjunct for c in sampler.calls] == [(0, 0), (0, 1)]
    assert [c.id for c in sampler.calls] == ["q9p0_1s", "q9p1_1s"]
    assert all(c.lookup == f"__llmsql_{c.id}" for c in sampler.calls)
    assert [len(con.sql(c.input.sql(dialect="duckdb")).fetchall()) for c in sampler.calls] == [
        SAMPLE_ROWS, SAMPLE_ROWS]
    # each filter is sampled from all its rows, not from the other filter's survivors
    unsampled = [c.input.find(exp.Subquery).this.sql(dialect="duckdb") for c in sampler.calls]
    assert [len(con.sql(q).fetchall()) for q in unsampled] == [400, 400]
    # genre: ~6 tokens a row, drops all; review: ~36 tokens a row, drops 3 in 4
    assert conjuncts(plan) == [(0, 1), (0, 0)]
    assert [c.id for c in plan.calls] == ["q9o_1", "q9o_2"]
    assert plan == plan_query(ctx.sql, ctx.tree, query_id="q9o",
                              predicate_order={(0, 1): 0.0, (0, 0): 1.0})


def test_filter_that_keeps_everything_stays_last(con: duckdb.DuckDBPyConnection) -> None:
    con.register("t", table(genre_passes=True))
    sampler = DuckSampler(con)
    ctx = context(TWO_FILTERS, sampler)
    plan, _ = optimize_plan(written(ctx), ctx)
    assert len(sampler.calls) == 2
    assert conjuncts(plan) == [(0, 0), (0, 1)]  # written order, re-planned under q9o
    assert [c.id for c in plan.calls] == ["q9o_1", "q9o_2"]


@pytest.mark.parametrize(("sql", "reorder"), [
    (TWO_FILTERS, False),  # the optimizer is off
    ("SELECT id FROM t WHERE LLM_FILTER('Good?', review) AND id > 3", True),  # one filter
    (("SELECT id FROM t WHERE LLM_FILTER('Good?', review) "
      "AND LLM_CLASSIFY('Kind?', genre, labels => ['a', 'b']) = 'a'"), True),  # not all filters
])
def test_nothing_to_order_is_never_sampled(
    sql: str, reorder: bool, con: duckdb.DuckDBPyConnection
) -> None:
    con.register("t", table(genre_passes=False))
    sampler = DuckSampler(con)
    ctx = context(sql, sampler, reorder=reorder)
    before = written(ctx)
    after, trace = optimize_plan(before, ctx)
    assert sampler.calls == [] and after is before and len(trace) == 1


def test_calls_outside_where_follow_the_ordered_filters(con: duckdb.DuckDBPyConnection) -> None:
    con.register("t", table(genre_passes=False))
    sql = ("SELECT LLM('Say', review) AS s FROM t WHERE LLM_FILTER('Good?', review) "
           "AND LLM_FILTER('Good?', genre)")
    sampler = DuckSampler(con)
    ctx = context(sql, sampler)
    plan, _ = optimize_plan(written(ctx), ctx)
    assert len(sampler.calls) == 2
    assert conjuncts(plan) == [(0, 1), (0, 0), None]
    assert "__llmsql_q9o_2" in plan.calls[2].input.sql()  # the SELECT call reads both


def test_filters_over_other_calls_answers_keep_the_written_order(
    con: duckdb.DuckDBPyConnection,
) -> None:
    con.register("t", table(genre_passes=False))
    sql = ("SELECT id FROM (SELECT id, review, genre FROM t WHERE LLM_FILTER('Good?', review) "
           "AND LLM_FILTER('Good?', genre)) AS s "
           "WHERE LLM_FILTER('Fine?', review) AND LLM_FILTER('Fine?', genre)")
    sampler = DuckSampler(con)
    ctx = context(sql, sampler)
    before = written(ctx)
    after, _ = optimize_plan(before, ctx)
    # the inner scope's two filters were sampled; the outer ones read their answers
    assert [c.conjunct for c in sampler.calls] == [(0, 0), (0, 1)]
    assert after is before


def test_the_samplers_errors_pass_through_and_a_passs_bug_is_named(
    con: duckdb.DuckDBPyConnection,
) -> None:
    con.register("t", table(genre_passes=False))

    def broken_engine(call: LLMCall) -> PredicateSample:
        raise duckdb.CatalogException(f"no table for {call.id}")

    ctx = PlanContext(sql=TWO_FILTERS, tree=parse(TWO_FILTERS)[0], sample=broken_engine)
    with pytest.raises(duckdb.CatalogException, match="no table for qp0_1s"):
        optimize_plan(written(ctx), ctx)

    def buggy_pass(plan: QueryPlan, ctx: PlanContext) -> QueryPlan:
        return {}["oops"]  # type: ignore[no-any-return]

    with pytest.raises(OptimizerError, match="'buggy_pass' failed: KeyError"):
        optimize_plan(written(ctx), ctx, passes=(buggy_pass,))

    def refusing_pass(plan: QueryPlan, ctx: PlanContext) -> QueryPlan:
        raise PlanError("no", sql=ctx.sql)

    with pytest.raises(PlanError):  # llmsql's own errors are not re-wrapped
        optimize_plan(written(ctx), ctx, passes=(refusing_pass,))


def test_plan_passes_are_listed_in_order() -> None:
    assert (order_llm_predicates,) == PLAN_PASSES
    ctx = PlanContext(sql="SELECT 1", tree=exp.select("1"), sample=lambda call: None)  # type: ignore[arg-type,return-value]
    plan = plan_query(ctx.sql, ctx.tree)
    assert optimize_plan(plan, ctx, passes=())[0] is plan
