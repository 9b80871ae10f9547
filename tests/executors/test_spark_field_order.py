"""Per-row field orders on Spark are DuckDB's (issue 11): same prompts, so same answers.

A call with several appended fields gets, per row, the field order that ``reorder_prompts``
chooses over the call's whole distinct input. On Spark the rules run per partition, over
that partition's rows only; the driver now computes the orders over all distinct inputs and
the partitions keep them. Checked on 400 rows of the shared climate_fever table (claim,
article, evidence: claims and articles both repeat, so the rule gives rows several
different field orders), shuffled, with 1 and 3 partitions, against the prompts the
deterministic rule function of ``tests/answers.py`` receives on DuckDB.

The rule backend is an object, so its steps are answered on the driver, partition by
partition: each partition's rows go through the same ``run_call`` (and rules) as a task's
do on an executor, over that partition's rows only. The last test checks the tasks on the
executors themselves, with the real model. Before the fix, 61 of the 400 prompts differed
from DuckDB's on 3 affinity partitions and 82 on 3 round-robin ones.
"""

from __future__ import annotations

import contextlib
import random
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest

import llmsql
from tests.answers import RuleBackend
from tests.conftest import DATASETS
from tests.executors.spark_fixtures import MODEL, multiset, spark_session

pytestmark = pytest.mark.spark

QUERY = ("SELECT id FROM climate WHERE LLM_FILTER('Does the evidence support the claim?', "
         "claim, article, evidence)")
PINNED = "field orders chosen over all"
PER_PARTITION = "field order chosen per partition"


def climate(seed: int) -> pd.DataFrame:
    """400 rows of climate_fever (claim, article, evidence) with an id, shuffled by ``seed``."""
    table = pq.read_table(DATASETS / "climate_fever" / "claim_evidence.parquet",
                          columns=["claim", "article", "evidence"]).slice(0, 400)
    frame = table.to_pandas()
    frame.insert(0, "id", range(len(frame)))
    rows = list(range(len(frame)))
    random.Random(seed).shuffle(rows)
    return frame.iloc[rows].reset_index(drop=True)


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    with spark_session("local[2]") as s:
        yield s


@pytest.fixture(scope="module")
def duckdb_run() -> tuple[list[str], list[str]]:
    """DuckDB's sorted prompts and result for QUERY over the unshuffled rows."""
    backend = RuleBackend()
    with llmsql.connect(backend=backend, progress=False, cache=False) as con:
        con.register("climate", climate(0))
        result = multiset(con.sql(QUERY).arrow())
        notes = " ".join(con.last_stats.calls[-1].notes) if con.last_stats else ""
    assert len(set(backend.prompts)) == 400
    orders = re.search(r"(\d+) distinct field order", notes)
    assert orders is not None and int(orders.group(1)) > 1, notes  # several orders in play
    return sorted(backend.prompts), result


@contextlib.contextmanager
def spark_connect(spark: Any, conf: dict[str, str], **options: Any) -> Iterator[llmsql.Session]:
    """An llmsql session on ``spark`` built with ``spark.llmsql.*`` settings ``conf`` (read
    once, when the session is built; the SparkSession gets its own settings back)."""
    for key, value in conf.items():
        spark.conf.set(f"spark.llmsql.{key}", value)
    try:
        con = llmsql.connect(engine="spark", spark=spark, **options)
    finally:
        for key in conf:
            spark.conf.unset(f"spark.llmsql.{key}")
    with con:
        yield con


def run_on_spark(spark: Any, data: pd.DataFrame, **conf: str) -> tuple[RuleBackend, Any]:
    """QUERY on Spark with ``spark.llmsql.*`` settings ``conf``; the backend (with the
    prompts it received), the result and the call's notes."""
    backend = RuleBackend()
    with spark_connect(spark, conf, backend=backend, progress=False, cache=False) as con:
        con.register("climate", spark.createDataFrame(data).repartition(3))
        result = con.sql(QUERY)
        table = result.arrow()
        notes = con.last_stats.calls[-1].notes if con.last_stats is not None else ()
    return backend, (multiset(table), notes)


@pytest.mark.parametrize(("partitions", "partitioning", "seed"),
                         [("1", "affinity", 1), ("3", "affinity", 2), ("3", "default", 3)],
                         ids=["1-partition", "3-partitions", "3-round-robin"])
def test_spark_sends_duckdbs_prompts(spark: Any, duckdb_run: tuple[list[str], list[str]],
                                     partitions: str, partitioning: str, seed: int) -> None:
    """Zero differences: the multiset of prompts the backend receives on Spark is DuckDB's,
    and so is the result."""
    prompts, result = duckdb_run
    backend, (table, notes) = run_on_spark(spark, climate(seed), partitions=partitions,
                                           partitioning=partitioning)
    assert sorted(backend.prompts) == prompts
    assert table == result
    assert any(PINNED in n for n in notes), notes


def test_above_the_limit_orders_are_chosen_per_partition(spark: Any) -> None:
    """Beyond ``spark.llmsql.maxFieldOrderRows`` distinct inputs, each partition chooses its
    rows' field orders, and the call's notes say that answers may then differ from DuckDB's."""
    _, (_, notes) = run_on_spark(spark, climate(4), partitions="3", maxFieldOrderRows="50")
    text = " ".join(notes)
    assert f"{PER_PARTITION} (400 distinct inputs > spark.llmsql.maxFieldOrderRows = 50)" in text
    assert "may get another field order, and answer, than on DuckDB" in text
    assert PINNED not in text


# ---- on the executors: the real model, answered by the executors' inference worker ----------

CITIES = pd.DataFrame({"id": [1, 2, 3], "city": ["Rome", "Oslo", "Lima"],
                       "note": ["One of the capital cities of a country in the world."] * 3})
CITY_QUERY = "SELECT id FROM cities WHERE LLM_FILTER('Is it a capital?', city, note)"
"""Over the three rows, the shared note leads every prompt; the layout splits its one prefix
group over the 3 partitions, and a partition's rules alone would give a row by itself the
written order (city first): without the driver's field orders (``maxFieldOrderRows = 0``)
one prompt differed from DuckDB's."""


def sent_prompt_keys(cache: Path) -> set[bytes]:
    """The result cache's keys: one digest per distinct request answered (prompt included)."""
    with contextlib.closing(sqlite3.connect(cache)) as db:
        return {bytes(k) for (k,) in db.execute("SELECT key FROM answers")}


@pytest.mark.model
def test_executor_tasks_send_duckdbs_prompts(spark: Any, tmp_path: Path) -> None:
    """The tasks on the executors (real model) send DuckDB's prompts: the requests each engine
    answered, read back as result-cache keys (a digest of model, prompt and options), are
    the same three."""
    with llmsql.connect(**{**MODEL, "cache": str(tmp_path / "duck.sqlite")}) as duck:
        duck.register("cities", CITIES)
        expected = multiset(duck.sql(CITY_QUERY).arrow())
    with spark_connect(spark, {"partitions": "3"},
                       **{**MODEL, "cache": str(tmp_path / "spark.sqlite")}) as con:
        con.register("cities", CITIES)
        assert multiset(con.sql(CITY_QUERY).arrow()) == expected
        assert con.last_stats is not None
        notes = " ".join(con.last_stats.calls[-1].notes)
    assert "answered on the driver" not in notes and PINNED in notes, notes
    duck_keys = sent_prompt_keys(tmp_path / "duck.sqlite")
    assert len(duck_keys) == 3
    assert sent_prompt_keys(tmp_path / "spark.sqlite") == duck_keys
