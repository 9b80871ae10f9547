"""Results: Arrow, pandas and previews on DuckDB; a Spark DataFrame needs a SparkSession.

The Spark engine's results (kept in Spark, ``Result.spark()``) are tested in
``tests/executors/test_spark.py``.
"""

from __future__ import annotations

import pytest

import llmsql
from llmsql.errors import ConfigError


def test_duckdb_result_reads_as_arrow_pandas_and_a_preview(dry: llmsql.Session) -> None:
    res = dry.sql("SELECT id, LLM('Say', review) AS s FROM reviews ORDER BY id")
    assert len(res) == 6 and res.arrow().column("id").to_pylist() == [1, 2, 3, 4, 5, 6]
    assert list(res.df().columns) == ["id", "s"]
    assert "(4 more rows)" in res.preview(2)


def test_duckdb_result_to_spark_needs_a_spark_session(dry: llmsql.Session) -> None:
    res = dry.sql("SELECT id FROM reviews")
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        active = None
    else:
        active = SparkSession.getActiveSession()
    if active is not None:  # another test module left one running: it would be used
        pytest.skip("a SparkSession is active in this process")
    with pytest.raises(ConfigError, match=r"result.spark\(spark\)|needs pyspark"):
        res.spark()
