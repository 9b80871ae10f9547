"""The Spark engine on ``local[2]``: same results as DuckDB, DataFrame API, EXPLAIN, CLI.

Semantics over many query shapes run with the deterministic rule function of
``tests/answers.py`` (a backend object cannot be rebuilt on executors, so those steps are
answered on the driver -- the Spark SQL, the layout and the lookups are Spark's). Results
with the real embedded model go through the executors' inference worker and are compared
with the DuckDB engine on the same model (greedy decoding, one prompt per batch so that
batch composition cannot change a near-tie).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest

import llmsql
from llmsql.errors import BudgetExceeded, ConfigError, ExecutionError, PlanError
from tests.executors.spark_fixtures import (
    FILTER,
    MAP,
    MODEL,
    MODEL_QUERIES,
    REVIEWS,
    SHAPES,
    multiset,
    rule_sessions,
    spark_session,
    with_tables,
)

pytestmark = pytest.mark.spark

@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    with spark_session("local[2]", **{"spark.llmsql.partitions": "3"}) as s:
        yield s


@pytest.fixture(scope="module")
def rule_pair(spark: Any) -> Iterator[tuple[llmsql.Session, llmsql.Session]]:
    with rule_sessions(spark) as pair:
        yield pair




@pytest.mark.parametrize("sql", SHAPES, ids=range(len(SHAPES)))
def test_same_results_as_duckdb_for_every_shape(
    rule_pair: tuple[llmsql.Session, llmsql.Session], sql: str
) -> None:
    duck, sp = rule_pair
    assert multiset(sp.sql(sql).arrow()) == multiset(duck.sql(sql).arrow())


def test_unknown_column_is_a_plan_error(rule_pair: tuple[llmsql.Session, llmsql.Session]) -> None:
    with pytest.raises(PlanError, match="reviw"):
        rule_pair[1].sql("SELECT LLM('Say', reviw) FROM reviews")


def test_explain_shows_the_affinity_layout_and_the_split(spark: Any) -> None:
    big = pd.DataFrame({"synopsis": ["A long shared synopsis " * 8] * 12 + ["Other"] * 2,
                        "review": [f"review {i}" for i in range(14)]})
    with llmsql.connect(dry_run=True, engine="spark", spark=spark, cache=False) as con:
        con.register("big", big)
        e = con.explain("SELECT review FROM big WHERE LLM_FILTER('Good?', synopsis, review)")
    assert "affinity partitioning on synopsis: 2 prefix group(s) -> 3 partition(s)" in e.text
    assert "split: synopsis='A long shared synopsis" in e.text and "cut by review" in e.text
    assert len(e.prompts) == 14
    assert all(p.startswith("Good?\nsynopsis: ") for p in e.prompts)


def test_cli_runs_on_spark(spark: Any, tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from llmsql.cli import main

    path = tmp_path / "reviews.csv"
    REVIEWS.to_csv(path, index=False)
    code = main(["explain", "--engine", "spark", "--master", "local[2]", "--no-cache",
                 "--table", f"reviews={path}", "-e",
                 "SELECT id FROM reviews WHERE LLM_FILTER('Good?', genre, review)"])
    assert code == 0
    assert "affinity partitioning on genre" in capsys.readouterr().out
    out = tmp_path / "out.parquet"  # a result kept in Spark, written by the CLI
    assert main(["run", "--engine", "spark", "--master", "local[2]", "--no-cache", "--table",
                 f"reviews={path}", "-e", "SELECT id FROM reviews ORDER BY id", "-o",
                 str(out)]) == 0
    assert pd.read_parquet(out)["id"].tolist() == [1, 2, 3, 4, 5, 6]
    assert main(["explain", "--master", "local[2]", "-e", "SELECT 1"]) == 1
    assert "--master needs --engine spark" in capsys.readouterr().err


def test_bad_settings_are_config_errors(spark: Any) -> None:
    with pytest.raises(ConfigError, match="duckdb"):
        llmsql.connect(engine="spark", spark=spark, database="x.db", dry_run=True)
    with pytest.raises(ConfigError, match="SparkSession or a master URL"):
        llmsql.connect(engine="spark", spark=42, dry_run=True)


# ---- the real model, answered on the executors --------------------------------------------

@pytest.fixture(scope="module")
def model_pair(spark: Any) -> Iterator[tuple[llmsql.Session, llmsql.Session]]:
    duck = with_tables(llmsql.connect(**MODEL))
    sp = with_tables(llmsql.connect(engine="spark", spark=spark, **MODEL))
    yield duck, sp
    duck.close()
    sp.close()


@pytest.mark.model
@pytest.mark.parametrize("name", list(MODEL_QUERIES))
def test_model_answers_equal_duckdb(model_pair: tuple[llmsql.Session, llmsql.Session],
                                    name: str) -> None:
    duck, sp = model_pair
    sql = MODEL_QUERIES[name]
    got = sp.sql(sql)
    assert multiset(got.arrow()) == multiset(duck.sql(sql).arrow())
    assert got.stats.calls[-1].sent > 0  # answered by the executors' worker
    assert "answered on the driver" not in " ".join(got.stats.calls[-1].notes)


@pytest.mark.model
def test_dataframe_api_equals_sql_on_duckdb(
    spark: Any, model_pair: tuple[llmsql.Session, llmsql.Session]
) -> None:
    from pyspark.sql import functions as F

    from llmsql.spark_columns import llm, llm_agg, llm_classify, llm_extract, llm_filter

    duck = model_pair[0]
    kw: dict[str, Any] = {"backend": "transformers", "batch_size": 1,
                          "backend_options": {"threads": 1, "idle_timeout": 120}}
    df = spark.createDataFrame(REVIEWS)

    def same(frame: Any, name: str) -> None:
        assert multiset(frame.toArrow()) == multiset(duck.sql(MODEL_QUERIES[name]).arrow())

    same(df.filter(llm_filter(FILTER, df.review, **kw)).select("id"), "filter")
    same(df.select("id", llm(MAP, "review", max_tokens=4, **kw).alias("s")), "map")
    same(df.withColumn("k", llm_classify("Sentiment?", "review",
                                         labels=["positive", "negative"], **kw))
         .groupBy("k").agg(F.count(F.lit(1)).alias("n")), "classify")
    same(df.select("id", llm_extract("Give the review as JSON with its first word.", "review",
                                     schema="word VARCHAR", max_tokens=12, **kw).alias("e")),
         "extract")
    # one input partition: rows reach each group in table order, as in DuckDB
    same(df.coalesce(1).groupBy("movie")
         .agg(llm_agg("Summarize the reviews.", "review", max_tokens=4, **kw).alias("n")),
         "agg")


# ---- results, the result cache, known answers and budgets on executors --------------------


def worker_requests(spark: Any, con: llmsql.Session) -> int:
    """Requests the executor's inference worker has generated so far (``local[2]`` has one
    executor, so one worker per spec), read by a Spark task on that executor."""
    from llmsql.executors.spark.worker import worker_backend

    spec = con.spec()
    read = spark.sparkContext.parallelize([0], 1).mapPartitions(
        lambda _: [worker_backend(spec).stats().requests])
    return int(read.collect()[0])


def test_duckdb_result_as_a_spark_dataframe(
    spark: Any, rule_pair: tuple[llmsql.Session, llmsql.Session]
) -> None:
    res = rule_pair[0].sql(SHAPES[1])  # engine='duckdb'

    assert multiset(res.spark(spark).toArrow()) == multiset(res.arrow())
    assert multiset(res.spark().toArrow()) == multiset(res.arrow())  # the active session


def test_spark_result_is_a_dataframe_that_outlives_the_query(
    rule_pair: tuple[llmsql.Session, llmsql.Session],
) -> None:
    sp = rule_pair[1]
    res = sp.sql(SHAPES[0] + " ORDER BY id")
    frame = res.spark()
    assert frame.toArrow().equals(res.arrow())  # same rows, same order
    sp.sql(SHAPES[2])  # another query, its lookups dropped in turn
    assert frame.toArrow().equals(res.arrow()) and frame.count() == len(res) == 2
    assert "(1 more rows)" in sp.sql(SHAPES[0]).preview(1)  # collects one row, counts two
    with pytest.raises(PlanError, match="reviw"):  # errors of the final query surface here
        sp.sql("SELECT id FROM reviews WHERE LLM_FILTER('Good?', review) AND reviw > 1")
    with pytest.raises(ExecutionError, match="the query failed in Spark"):  # at run time too
        sp.sql("SELECT CAST(review AS INT) AS n FROM reviews WHERE LLM_FILTER('Good?', review)")


@pytest.mark.model
def test_spark_result_never_reruns_llm_calls(
    spark: Any, model_pair: tuple[llmsql.Session, llmsql.Session]
) -> None:
    sp = model_pair[1]
    res = sp.sql(MODEL_QUERIES["map"])
    before = worker_requests(spark, sp)
    frame = res.spark()  # lazy: nothing collected to the driver yet
    assert multiset(frame.toArrow()) == multiset(res.arrow())
    other = sp.sql(MODEL_QUERIES["classify"])
    assert multiset(frame.select("s").toArrow()) == multiset(res.arrow().select(["s"]))
    sent = sum(c.sent + c.warmup_prompts for c in other.stats.calls)
    assert worker_requests(spark, sp) == before + sent  # only the other query's prompts


@pytest.mark.model
def test_executors_read_and_write_the_result_cache(spark: Any, tmp_path: Any) -> None:
    sql = f"SELECT id FROM reviews WHERE LLM_FILTER('{FILTER} Answer Yes or No.', review)"
    with with_tables(llmsql.connect(engine="spark", spark=spark,
                                **{**MODEL, "cache": tmp_path / "c.sqlite"})) as con:
        first = con.sql(sql)
        assert first.stats.calls[-1].sent == 5 and first.stats.calls[-1].from_cache == 0
        before = worker_requests(spark, con)
        again = con.sql(sql)  # as a retried task would: every answer is in the cache
        after = worker_requests(spark, con)
    call = again.stats.calls[-1]
    assert (call.sent, call.from_cache) == (0, 5), (call.notes, first.stats.calls[-1].notes)
    assert after == before, again.stats.summary()
    assert multiset(again.arrow()) == multiset(first.arrow())
    assert "from the result cache" in again.stats.summary()


@pytest.mark.model
def test_selectivity_sample_answers_are_not_sent_again(
    spark: Any, model_pair: tuple[llmsql.Session, llmsql.Session]
) -> None:
    duck, sp = model_pair
    sql = (f"SELECT id FROM reviews WHERE LLM_FILTER('{FILTER}', review) "
           "AND LLM_FILTER('Is the review short?', review)")
    before = worker_requests(spark, sp)
    res = sp.sql(sql)
    samples = [c for c in res.stats.calls if c.where.endswith("(selectivity sample)")]
    calls = [c for c in res.stats.calls if c not in samples]
    assert len(samples) == 2 and [c.distinct_prompts for c in samples] == [5, 5]
    assert calls[0].distinct_prompts == calls[0].reused == 5  # the 32-row sample saw them all
    assert sum(c.sent for c in calls) == 0
    assert worker_requests(spark, sp) == before + sum(c.sent for c in samples) == before + 10
    assert multiset(res.arrow()) == multiset(duck.sql(sql).arrow())


@pytest.mark.model
def test_budgets_are_split_over_partitions_and_enforced(spark: Any) -> None:
    sql = "SELECT id, LLM('Name one color.', review, max_tokens => 2) AS c FROM reviews"
    with with_tables(llmsql.connect(engine="spark", spark=spark, **MODEL)) as con:
        before = worker_requests(spark, con)
        con.set("max_calls", 4)
        with pytest.raises(BudgetExceeded, match=r"split over 3 partition\(s\)") as info:
            con.sql(sql)
        assert info.value.budget == "max_calls" and info.value.limit == 4
        assert "SET llmsql.max_calls" in str(info.value)
        spent = worker_requests(spark, con) - before
        assert spent == info.value.used <= 4  # what the tasks spent, charged to the query
        con.set("max_calls", 50)
        assert len(con.sql(sql)) == 6  # a generous budget passes
        con.set("max_calls", None)
        con.set("max_cost_usd", 1)
        with pytest.raises(ConfigError, match="no price is known"):
            con.sql(sql)
