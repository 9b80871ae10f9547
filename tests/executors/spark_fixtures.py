"""Spark test helpers: a real SparkSession per test module (``local[2]`` or ``local-cluster``)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def spark_session(master: str, **conf: str) -> Iterator[Any]:
    """A SparkSession on ``master`` whose executors can import this checkout; stopped after.

    Spark binds to 127.0.0.1 and runs Python workers with this interpreter.
    """
    pytest.importorskip("pyspark", reason="pyspark is not installed (pip install '.[spark]')")
    from pyspark.sql import SparkSession

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARK_LOCAL_IP", "127.0.0.1")
        mp.setenv("PYSPARK_PYTHON", sys.executable)
        mp.setenv("PYSPARK_DRIVER_PYTHON", sys.executable)
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        builder = (SparkSession.builder.master(master).appName("llmsql-tests")
                   .config("spark.ui.enabled", "false")
                   .config("spark.ui.showConsoleProgress", "false")
                   .config("spark.sql.shuffle.partitions", "4")
                   .config("spark.executorEnv.PYTHONPATH", path))
        for key, value in conf.items():
            builder = builder.config(key, value)
        spark = builder.getOrCreate()
        spark.sparkContext.setLogLevel("ERROR")
        try:
            yield spark
        finally:
            spark.stop()


def multiset(table: Any) -> list[str]:
    """A result's rows as a sorted list of normalized texts (numbers compared as floats)."""

    def norm(v: Any) -> Any:
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return v
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        try:
            return float(v)
        except (TypeError, ValueError):
            return v

    cols = [table.column(i).to_pylist() for i in range(table.num_columns)]
    return sorted(repr([norm(v) for v in row]) for row in zip(*cols, strict=True))
