"""The Spark engine through Spark Connect: same results as DuckDB, DataFrame API, URL attach.

A real Spark Connect server (``local[2]``, its own JVM, as ``start-connect-server.sh``
starts it) listens on a free localhost port; this test process is a pure Connect client of
it, as on a cluster. pyspark's in-process ``remote("local[2]")`` is not used: it binds the
fixed port 15002 (two test runs on one machine would meet there), and stopping *any*
Connect session of such a process also stops its server.

Query shapes run with the deterministic rule function of ``tests/answers.py`` (answered on
the driver, with the Spark SQL, layout and lookups on the server); the real embedded model
answers on the server's executors, compared with the DuckDB engine on the same model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest

import llmsql
from llmsql.executors.spark.session import QUERY_CONF
from tests.answers import RuleBackend
from tests.executors.spark_fixtures import (
    FILTER,
    MODEL,
    MODEL_QUERIES,
    REVIEWS,
    ROOT,
    connect_server,
    connect_session,
    multiset,
    rule_sessions,
    with_tables,
)
from tests.executors.spark_fixtures import SHAPES as ALL_SHAPES

pytest.importorskip("pyspark", reason="pyspark is not installed (pip install '.[spark]')")
for _module in ("grpc", "grpc_status", "google.protobuf", "zstandard"):
    pytest.importorskip(_module, reason="the Spark Connect client is not installed "
                                         "(pip install '.[spark]')")

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("connect") / "server.log"
    # no spark.llmsql.partitions: the layout asks the server for its default parallelism
    conf = {"spark.sql.leafNodeDefaultParallelism": "3"}
    with connect_server("local[2]", log, **conf) as address:
        yield address


@pytest.fixture(scope="module")
def spark(url: str) -> Iterator[Any]:
    with connect_session(url) as session:
        yield session


# ---- query shapes (rule answers) ------------------------------------------------------------


@pytest.fixture(scope="module")
def rule_pair(spark: Any) -> Iterator[tuple[llmsql.Session, llmsql.Session]]:
    with rule_sessions(spark) as pair:
        yield pair


SHAPES = [ALL_SHAPES[i] for i in (0, 1, 4, 6, 10)]  # one of each kind of rewrite


@pytest.mark.parametrize("sql", SHAPES, ids=range(len(SHAPES)))
def test_same_results_as_duckdb_for_every_shape(
    rule_pair: tuple[llmsql.Session, llmsql.Session], sql: str
) -> None:
    duck, sp = rule_pair
    assert multiset(sp.sql(sql).arrow()) == multiset(duck.sql(sql).arrow())


def test_query_settings_are_the_sessions_own_again_after_a_query(
    spark: Any, rule_pair: tuple[llmsql.Session, llmsql.Session]
) -> None:
    """The settings that size shuffles to the data hold for the query's steps only."""
    before = {k: spark.conf.get(k, None) for k in QUERY_CONF}
    assert before["spark.sql.optimizer.canChangeCachedPlanOutputPartitioning"] is None
    assert len(rule_pair[1].sql(ALL_SHAPES[1])) == 3
    assert {k: spark.conf.get(k, None) for k in QUERY_CONF} == before


def test_explain_shows_the_affinity_layout(spark: Any) -> None:
    big = pd.DataFrame({"synopsis": ["A long shared synopsis " * 8] * 12 + ["Other"] * 2,
                        "review": [f"review {i}" for i in range(14)]})
    with llmsql.connect(dry_run=True, engine="spark", spark=spark, cache=False,
                        progress=False) as con:
        con.register("big", big)
        e = con.explain("SELECT review FROM big WHERE LLM_FILTER('Good?', synopsis, review)")
    assert "affinity partitioning on synopsis: 2 prefix group(s) -> 3 partition(s)" in e.text
    assert len(e.prompts) == 14


# ---- the real model, answered on the server's executors -------------------------------------

@pytest.fixture(scope="module")
def expected() -> dict[str, list[str]]:
    """The DuckDB engine's results of MODEL_QUERIES on the same model."""
    with with_tables(llmsql.connect(**MODEL)) as duck:
        return {name: multiset(duck.sql(sql).arrow()) for name, sql in MODEL_QUERIES.items()}


@pytest.fixture(scope="module")
def model_spark(spark: Any) -> Iterator[llmsql.Session]:
    with with_tables(llmsql.connect(engine="spark", spark=spark, **MODEL)) as con:
        yield con


@pytest.mark.model
@pytest.mark.parametrize("name", list(MODEL_QUERIES))
def test_model_answers_equal_duckdb(model_spark: llmsql.Session,
                                    expected: dict[str, list[str]], name: str) -> None:
    got = model_spark.sql(MODEL_QUERIES[name])
    assert multiset(got.arrow()) == expected[name]
    assert got.stats.calls[-1].sent > 0  # answered by the server's executors
    assert "answered on the driver" not in " ".join(got.stats.calls[-1].notes)


@pytest.mark.model
def test_dataframe_api_on_a_connect_dataframe(spark: Any,
                                              expected: dict[str, list[str]]) -> None:
    """A boolean scalar UDF on a Column object, a struct result and a grouped aggregate."""
    from llmsql.spark_columns import llm_agg, llm_extract, llm_filter

    kw: dict[str, Any] = {"backend": "transformers", "batch_size": 1,
                          "backend_options": {"threads": 1, "idle_timeout": 120}}
    df = spark.createDataFrame(REVIEWS)
    assert type(df).__module__.startswith("pyspark.sql.connect")

    def same(frame: Any, name: str) -> None:
        assert multiset(frame.toArrow()) == expected[name]

    same(df.filter(llm_filter(FILTER, df.review, **kw)).select("id"), "filter")
    same(df.select("id", llm_extract("Give the review as JSON with its first word.", "review",
                                     schema="word VARCHAR", max_tokens=12, **kw).alias("e")),
         "extract")
    # one input partition: rows reach each group in table order, as in DuckDB
    same(df.coalesce(1).groupBy("movie")
         .agg(llm_agg("Summarize the reviews.", "review", max_tokens=4, **kw).alias("n")),
         "agg")


# ---- attaching by URL -----------------------------------------------------------------------


def test_url_uses_the_active_connect_session_and_leaves_it_open(spark: Any, url: str) -> None:
    from pyspark.sql.connect.session import SparkSession as ConnectSession

    assert isinstance(spark, ConnectSession)
    with llmsql.connect(engine="spark", spark=url, backend=RuleBackend(), cache=False,
                        progress=False) as con:
        con.register("url_reviews", REVIEWS)
        got = con.sql("SELECT id FROM url_reviews WHERE LLM_FILTER('Good?', review)")
        assert sorted(got.arrow().column("id").to_pylist()) == [1, 4]
        assert spark.table("url_reviews").count() == len(REVIEWS)  # the same session
    assert spark.sql("SELECT 1 AS x").toArrow().to_pylist() == [{"x": 1}]  # still open


CLIENT = """
import json, sys
import pandas as pd
import llmsql
from pyspark.sql import SparkSession

with llmsql.connect(engine="spark", spark=sys.argv[1], backend="transformers", threads=1,
                    batch_size=1, idle_timeout=120, cache=False, progress=False) as con:
    session = SparkSession.getActiveSession()
    con.register("t", pd.DataFrame({"id": [1, 2, 3],
                                    "review": ["Great fun", "Awful", "Great fun"]}))
    res = con.sql("SELECT id, LLM_FILTER('Is the review positive?', review) AS ok FROM t")
    print(json.dumps({"type": type(session).__module__, "rows": res.arrow().num_rows,
                      "sent": res.stats.calls[-1].sent,
                      "notes": list(res.stats.calls[-1].notes)}))
print(json.dumps({"stopped": session.is_stopped, "active": SparkSession.getActiveSession()
                  is not None}))
"""


@pytest.mark.model
def test_a_client_process_attaches_by_url(spark: Any, url: str) -> None:
    """A process with no Spark session of its own: ``spark='sc://...'`` opens one, runs the
    query on the server's executors, and stops only that session at close."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.pop("SPARK_CONNECT_MODE_ENABLED", None)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(CLIENT), url], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    first, last = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    assert first["type"].startswith("pyspark.sql.connect") and first["rows"] == 3
    assert first["sent"] > 0 and "answered on the driver" not in " ".join(first["notes"])
    assert last == {"stopped": True, "active": False}
    assert spark.sql("SELECT 1 AS x").toArrow().to_pylist() == [{"x": 1}]  # server still up
