"""Two executors (``local-cluster[2,1,2048]``): one inference worker each, prefix affinity.

``local-cluster`` starts a standalone master, two workers and two executor JVMs inside this
machine, from pip-installed pyspark (its package folder is SPARK_HOME). Executors import
llmsql through ``spark.executorEnv.PYTHONPATH``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest

import llmsql
from tests.executors.spark_fixtures import spark_session

pytestmark = [pytest.mark.spark, pytest.mark.model]

PARTITIONS = 4


def movies_table() -> pd.DataFrame:
    """Reviews of 8 movies; the synopsis is shared per movie, groups differ in size and
    synopsis length, so rows per group and tokens per group disagree."""
    sizes = [7, 6, 5, 4, 3, 3, 2, 2]
    rows = []
    for m, n in enumerate(sizes):
        synopsis = f"Movie {m}: " + "a quiet story of friendship and loss. " * (1 + (m * 3) % 5)
        rows += [{"id": len(rows) + i, "synopsis": synopsis, "review": f"Review {i} of {m}."}
                 for i in range(n)]
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def con() -> Iterator[llmsql.Session]:
    conf = {"spark.llmsql.partitions": str(PARTITIONS)}
    with spark_session("local-cluster[2,1,2048]", **conf) as spark:
        s = llmsql.connect(backend="transformers", engine="spark", spark=spark, threads=1,
                           idle_timeout=120, cache=False, progress=False)
        s.register("movies", movies_table())
        yield s
        s.close()


FILTER = ("SELECT id FROM movies WHERE LLM_FILTER('Does the critic like the movie?', "
          "synopsis, review)")
CLASSIFY = ("SELECT LLM_CLASSIFY('Tone?', labels => ['warm', 'cold'], synopsis, review) AS t, "
            "COUNT(*) AS n FROM movies GROUP BY t")


def test_one_worker_per_executor_across_tasks_and_queries(con: llmsql.Session) -> None:
    con.sql(FILTER)
    con.sql(CLASSIFY)
    reports: list[Any] = con.executor.reports  # type: ignore[attr-defined]
    calls = {r.call_id for r in reports}
    assert len(calls) >= 2 and len(reports) >= 2 * PARTITIONS - 2  # several tasks, 2 queries
    workers: dict[str, set[int]] = defaultdict(set)
    for r in reports:
        workers[r.executor].add(r.worker_pid)
    assert len(workers) == 2, workers  # both executors answered
    assert all(len(pids) == 1 for pids in workers.values()), workers  # one worker each...
    assert {r.model_loads for r in reports} == {1}  # ...that loaded the model once
    assert sum(r.cached_tokens for r in reports) > 0  # the workers report prefix reuse


def test_prefix_groups_stay_in_one_partition_and_tokens_are_balanced(
    con: llmsql.Session,
) -> None:
    result = con.sql(FILTER)
    call_id = result.stats.calls[-1].call_id
    reports = [r for r in con.executor.reports if r.call_id == call_id]  # type: ignore[attr-defined]
    seen: dict[str, set[int]] = defaultdict(set)
    for r in reports:
        for value in r.lead_values or ():
            seen[value].add(r.partition)
    assert len(seen) == 8  # every movie's synopsis was the leading field
    assert all(len(parts) == 1 for parts in seen.values()), seen
    notes = " ".join(result.stats.calls[-1].notes)
    assert "affinity partitioning on synopsis: 8 prefix group(s) -> 4 partition(s)" in notes
    tokens = [r.prompt_tokens for r in reports]
    rows = [r.rows for r in reports]
    assert max(tokens) / (sum(tokens) / PARTITIONS) < 1.35, (tokens, rows)


def test_both_executors_share_one_result_cache(con: llmsql.Session, tmp_path: Any) -> None:
    """Tasks in two executor JVMs (and their Python workers) write one SQLite file at once;
    a re-run -- or a retried task -- answers from it without attaching to any worker."""
    spark = con.executor.spark  # type: ignore[attr-defined]
    with llmsql.connect(backend="transformers", engine="spark", spark=spark, threads=1,
                        idle_timeout=120, cache=tmp_path / "c.sqlite", progress=False) as cached:
        cached.register("movies", movies_table())
        first = cached.sql(FILTER)
        again = cached.sql(FILTER)
        reports = [r for r in cached.executor.reports  # type: ignore[attr-defined]
                   if r.call_id == again.stats.calls[-1].call_id]
    assert len({r.executor for r in cached.executor.reports}) == 2  # type: ignore[attr-defined]
    assert first.stats.calls[-1].sent == 32 and first.stats.calls[-1].from_cache == 0
    assert again.stats.calls[-1].sent == 0 and again.stats.calls[-1].from_cache == 32
    assert {r.worker_pid for r in reports} == {0}  # no task needed a worker
    assert sorted(again.arrow().column("id").to_pylist()) == sorted(
        first.arrow().column("id").to_pylist())
