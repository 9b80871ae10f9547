"""Expert offload on Spark local (issue 15): the executors' inference workers build the
transformers backend from the session's spec, expert offload options included, each with its
own expert cache; the answers equal DuckDB's without offload (a tiny random-weight Mixtral,
float32 on the CPU). EXPLAIN ANALYZE shows per call what the workers' offload measured for
its tasks (their replies' counters, summed on the driver)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import llmsql
from llmsql.backends.moe_glue import stats_sum
from llmsql.errors import LLMSQLError
from tests.executors.spark_fixtures import REVIEWS, spark_session
from tests.moe_fixtures import write_tiny_moe

pytestmark = pytest.mark.spark

SQL = ("SELECT id, LLM('Describe it', review, max_tokens => 4) AS d FROM reviews "
       "WHERE LLM_FILTER('Is it short?', review) ORDER BY id")
FILTER_SQL = "SELECT id FROM reviews WHERE LLM_FILTER('Is it short?', review) ORDER BY id"
OPTIONS = {"backend": "transformers", "threads": 1, "dtype": "float32", "idle_timeout": 120,
           "cache": False, "progress": False}


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    with spark_session("local[2]", **{"spark.llmsql.partitions": "2"}) as s:
        yield s


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    pytest.importorskip("llmsql.engine.moe.offload", reason="the expert offload engine is missing")
    return str(write_tiny_moe(tmp_path_factory.mktemp("moe") / "tiny-mixtral"))


def _rows(con: Any) -> list[dict[str, Any]]:
    con.register("reviews", REVIEWS)
    try:
        return list(con.sql(SQL).arrow().to_pylist())
    finally:
        con.close()


def test_offloaded_answers_on_spark_equal_duckdb_without_offload(spark: Any, tiny: str) -> None:
    want = _rows(llmsql.connect(model=tiny, **OPTIONS))
    con = llmsql.connect(model=tiny, engine="spark", spark=spark, expert_cache=0.5,
                         moe_plan="lru", **OPTIONS)
    con.register("reviews", REVIEWS)
    try:
        result = con.sql(SQL)
        assert result.arrow().to_pylist() == want
        assert result.stats.calls[-1].sent > 0  # answered by the executors' workers
        assert Path(tiny, "config.json").is_file()
    finally:
        con.close()
    assert len(want) > 0 and len({r["d"] for r in want}) > 1  # not one answer for all


def test_the_executors_workers_load_the_offload_options(spark: Any, tiny: str,
                                                        tmp_path: Path) -> None:
    """A profile the driver never reads: only a worker that builds the backend with the
    session's offload options can fail on it."""
    missing = tmp_path / "no-such-profile.pt"
    con = llmsql.connect(model=tiny, engine="spark", spark=spark, expert_cache=0.5,
                         predictor="learned", moe_profile=str(missing), **OPTIONS)
    con.register("reviews", REVIEWS)
    try:
        with pytest.raises(LLMSQLError, match=str(missing)):
            con.sql(SQL)
    finally:
        con.close()


def _explain_analyze(con: Any) -> tuple[Any, list[Any]]:
    con.register("reviews", REVIEWS)
    try:
        return con.explain(FILTER_SQL, analyze=True), list(con.executor.reports)
    finally:
        con.close()


def test_explain_analyze_on_spark_shows_what_the_workers_measured(spark: Any, tiny: str) -> None:
    # options no other test uses: this query's worker starts fresh, so its counters are the
    # query's alone
    con = llmsql.connect(model=tiny, engine="spark", spark=spark, expert_cache=0.5,
                         moe_plan="lru", predictor="none", **OPTIONS)
    explained, reports = _explain_analyze(con)
    calls = [c for c in explained.calls if c.sent > 0]
    assert [c.kind for c in calls] == ["LLM_FILTER"], explained.text
    for call in calls:
        tasks = [r.moe for r in reports if r.call_id == call.call_id and r.moe is not None]
        total = stats_sum(tasks)
        assert len(tasks) >= 1 and total.needed > 0 and total.bytes_h2d > 0
        assert call.moe == total.describe()  # the partitions' sum, rates from the sums
        uses = re.search(r"moe measured: hit rate \d+% over (\d+) expert uses", call.moe)
        assert uses is not None and int(uses.group(1)) == total.needed
        assert f"    {call.moe}" in explained.text
    # the tasks' shares add up to what the worker measured (local[2]: one executor, one
    # worker; each report has its counters after that task)
    assert len({r.worker_pid for r in reports}) == 1
    last = max((r.worker["moe"] for r in reports), key=lambda m: m["needed"])
    measured = stats_sum(r.moe for r in reports if r.moe is not None)
    assert (measured.needed, measured.hits, measured.steps) == (
        last["needed"], last["hits"], last["steps"])
    assert measured.plans == (("lru", measured.steps),)


def test_explain_analyze_on_spark_without_offload_has_no_moe_line(spark: Any, tiny: str) -> None:
    con = llmsql.connect(model=tiny, engine="spark", spark=spark, **OPTIONS)
    explained, reports = _explain_analyze(con)
    assert any(c.sent > 0 for c in explained.calls)
    assert all(c.moe is None for c in explained.calls)
    assert "moe measured" not in explained.text
    assert reports and all(r.moe is None and r.worker["moe"] is None for r in reports)
