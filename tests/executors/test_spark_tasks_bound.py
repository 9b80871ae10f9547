"""How many Spark tasks a small query launches (issue 11): shuffles sized to the data.

A user's own ``local[2]`` session with Spark's default ``spark.sql.shuffle.partitions``
(200). Every task of a query is counted for real from Spark's status tracker over a job
group set around the query (classic Spark). Before the fix the persisted inputs of each LLM
call kept 200 partitions: the 12-row query below launched 1,828 tasks (2,422 with the
session's adaptive execution off), and the one-call query answered on the executors 615;
after it, 37 and 19.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest

import llmsql
from llmsql.executors.spark.session import QUERY_CONF
from tests.answers import RuleBackend
from tests.executors.spark_fixtures import MODEL, multiset, spark_session

pytestmark = pytest.mark.spark

TWELVE = pd.DataFrame({
    "id": list(range(12)),
    "movie": ["Up", "Heat", "Alien"] * 4,
    "review": [f"Great {i}" if i % 2 else f"Meh {i}" for i in range(12)],
})
QUERY = ("SELECT id, LLM('Say', movie, review) AS s FROM twelve "
         "WHERE LLM_FILTER('Good?', review)")
MAX_TASKS = 50
"""Tasks QUERY may launch in all (measured: 37 on ``local[2]``; 1,828 before the fix)."""
MODEL_QUERY = ("SELECT id, LLM('Name the movie.', movie, max_tokens => 2) AS s FROM twelve "
               "WHERE id > 0")
MAX_MODEL_TASKS = 30
"""Tasks MODEL_QUERY may launch (measured: 19 on ``local[2]``; 615 before the fix)."""


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    # Spark's default shuffle partitions, and llmsql's default partitions per LLM call on
    # local[2] (2) set explicitly: pyspark's builder keeps the options of earlier modules.
    conf = {"spark.sql.shuffle.partitions": "200", "spark.llmsql.partitions": "2"}
    with spark_session("local[2]", **conf) as s:
        yield s


def tasks_by_stage(spark: Any, group: str) -> dict[int, int]:
    """Tasks run per stage by the jobs of ``group`` (a stage shared by jobs counts once)."""
    sc = spark.sparkContext
    sc._jsc.sc().listenerBus().waitUntilEmpty()  # every task end has reached the tracker
    tracker = sc.statusTracker()
    stages = {s for job in tracker.getJobIdsForGroup(group)
              for s in tracker.getJobInfo(job).stageIds}
    infos = {s: tracker.getStageInfo(s) for s in stages}
    return {s: i.numCompletedTasks + i.numFailedTasks + i.numActiveTasks
            for s, i in infos.items() if i is not None}


def run_counted(spark: Any, con: llmsql.Session, query: str,
                group: str) -> tuple[Any, dict[int, int]]:
    """Run ``query`` and read its result inside job group ``group``; the tasks per stage."""
    sc = spark.sparkContext
    con.sql("SELECT 1")  # session start-up jobs are not the query's
    sc.setJobGroup(group, "llmsql: 12-row query")
    try:
        table = con.sql(query).arrow()
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
    return table, tasks_by_stage(spark, group)


@pytest.mark.parametrize("user_conf", [{}, {"spark.sql.adaptive.enabled": "false"}],
                         ids=["spark-defaults", "aqe-off"])
def test_twelve_row_query_launches_few_tasks(spark: Any, user_conf: dict[str, str]) -> None:
    """At most MAX_TASKS (50) tasks in all and at most 2 (the default parallelism) per
    stage, for a 12-row query with an LLM filter, an LLM map and their lookup joins; the
    session's own settings are back after the query."""
    for key, value in user_conf.items():
        spark.conf.set(key, value)
    before = {k: spark.conf.get(k, None) for k in QUERY_CONF}
    duck = llmsql.connect(backend=RuleBackend(), progress=False, cache=False)
    con = llmsql.connect(backend=RuleBackend(), progress=False, cache=False, engine="spark",
                         spark=spark)
    try:
        for session in (duck, con):
            session.register("twelve", TWELVE)
        table, stages = run_counted(spark, con, QUERY, f"twelve-{len(user_conf)}")
        assert multiset(table) == multiset(duck.sql(QUERY).arrow())
        assert len(table) == 6
        assert sum(stages.values()) <= MAX_TASKS, stages
        assert max(stages.values()) <= spark.sparkContext.defaultParallelism == 2, stages
        assert {k: spark.conf.get(k, None) for k in QUERY_CONF} == before
    finally:
        con.close()
        duck.close()
        for key in user_conf:
            spark.conf.unset(key)


@pytest.mark.model
def test_twelve_rows_answered_on_executors_launch_few_tasks(spark: Any) -> None:
    """At most MAX_MODEL_TASKS (30) tasks in all and at most 2 per stage when the real model
    answers on the executors (``mapInArrow``), the lookup join included."""
    with llmsql.connect(engine="spark", spark=spark, **MODEL) as con:
        con.register("twelve", TWELVE)
        table, stages = run_counted(spark, con, MODEL_QUERY, "twelve-model")
        assert con.last_stats is not None
        assert con.last_stats.calls[-1].sent == 3  # one per movie, by the executors' worker
    assert len(table) == 11
    assert sum(stages.values()) <= MAX_MODEL_TASKS, stages
    assert max(stages.values()) <= 2, stages
