"""Results: Arrow, pandas and previews on DuckDB; a Spark DataFrame needs a SparkSession.

The Spark engine's results (kept in Spark, ``Result.spark()``) are tested in
``tests/executors/test_spark.py``.
"""

from __future__ import annotations

import warnings

import pandas as pd
import pyarrow as pa
import pytest

import llmsql
from llmsql.errors import ConfigError


def test_duckdb_result_reads_as_arrow_pandas_and_a_preview(dry: llmsql.Session) -> None:
    res = dry.sql("SELECT id, LLM('Say', review) AS s FROM reviews ORDER BY id")
    assert len(res) == 6 and res.arrow().column("id").to_pylist() == [1, 2, 3, 4, 5, 6]
    assert list(res.df().columns) == ["id", "s"]
    assert "(4 more rows)" in res.preview(2)


# Columns of every kind whose conversion differs between pyarrow's to_pandas and DuckDB's .df():
# HUGEINT (SUM over integers) and DECIMAL, integers and booleans with NULLs, a NULL string,
# DATE, a TIMESTAMPTZ in the session's time zone, a list and a struct.
TYPED = ("SELECT id, SUM(id) OVER () AS total, CAST(stars AS DECIMAL(4, 1)) AS dec, "
         "NULLIF(stars, 5) AS stars, CASE WHEN id > 1 THEN id > 3 END AS flag, "
         "NULLIF(movie, 'Up') AS movie, DATE '2020-01-01' + CAST(id AS INT) AS day, "
         "TIMESTAMPTZ '2020-01-01 00:00:00+00' + to_hours(id) AS at, "
         "[id, stars] AS pair, {'id': id, 'movie': movie} AS rec FROM reviews")


# DuckDB 2.0's own .df() of a TIMESTAMPTZ calls DataFrame.drop(inplace=True), which pandas 3.1
# deprecates; llmsql's conversion does not (checked below).
@pytest.mark.filterwarnings("ignore:The inplace keyword in DataFrame.drop")
def test_duckdb_result_is_typed_as_duckdb_types_it(dry: llmsql.Session) -> None:
    dry.duckdb.execute("SET TimeZone = 'America/New_York'")
    res = dry.sql(f"{TYPED} WHERE LLM_FILTER('Keep?', review) ORDER BY id")  # dry run: all kept
    plain = dry.duckdb.sql(f"{TYPED} ORDER BY id")
    assert res.arrow().equals(plain.to_arrow_table())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = res.df()
    want = plain.df().astype({"total": "Int64"})  # a HUGEINT sum stays an integer
    pd.testing.assert_frame_equal(got, want)
    assert repr(got.values.tolist()) == repr(want.values.tolist())  # None is not NaN here
    assert {c: str(got[c].dtype) for c in ("total", "dec", "stars", "flag")} == {
        "total": "Int64", "dec": "float64", "stars": "Int64", "flag": "boolean"}
    assert str(got["at"].dtype) == "datetime64[us, America/New_York]"


def test_pandas_of_arrow_from_elsewhere() -> None:
    from llmsql.convert import to_pandas

    # Nanosecond timestamps with a zone (pandas' own unit) keep both unit and zone.
    at = to_pandas(pa.table({"at": pa.array([0, None], pa.timestamp("ns", tz="Asia/Tokyo"))}))
    assert str(at["at"].dtype) == "datetime64[ns, Asia/Tokyo]"
    assert at["at"][0] == pd.Timestamp(0, tz="UTC") and at["at"].isna().tolist() == [False, True]
    # DuckDB cannot read decimal256: pyarrow converts the table.
    big = to_pandas(pa.table({"big": pa.array([1, None], pa.decimal256(40, 0))}))
    assert big["big"].tolist()[1] is None
    # Names exactly as in .arrow() (DuckDB's own .df() would rename the second to id_1).
    twice = pa.table([[1], [2]], names=["id", "id"])
    assert to_pandas(twice).columns.tolist() == ["id", "id"]
    assert to_pandas(pa.table({})).shape == (0, 0)


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
