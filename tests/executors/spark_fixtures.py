"""Spark test helpers: a real SparkSession per test module (``local[2]`` or ``local-cluster``),
or a real Spark Connect server and a client session attached to it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import llmsql
from tests.answers import RuleBackend

ROOT = Path(__file__).resolve().parents[2]

# ---- the tables and queries the Spark tests share (classic and Connect) ------------------------

REVIEWS = pd.DataFrame({
    "id": [1, 2, 3, 4, 5, 6],
    "movie": ["Up", "Up", "Heat", "Heat", "Heat", None],
    "genre": ["animation", "animation", "crime", "crime", "crime", "drama"],
    "review": ["Great fun", "Too sweet", "Tense", "Great fun", "Long", "Odd"],
    "stars": [5, 2, 4, 5, 3, 1],
})
MOVIES = pd.DataFrame({"movie": ["Up", "Heat"], "year": [2009, 1995]})
MODEL = {"backend": "transformers", "threads": 1, "batch_size": 1, "idle_timeout": 120,
         "cache": False, "progress": False}
"""Session options for the real embedded model (one prompt per batch, so that batch
composition cannot change a near-tie between engines)."""

# One field per prompt keeps the real model's prompts short. With several appended fields,
# Spark gives every row DuckDB's field order too (chosen on the driver over the call's whole
# input; test_spark_field_order.py checks the prompts), and multi-field semantics are
# covered with the order-independent rule function.
FILTER = "Is the review positive?"
MAP = "In three words, what does the review say?"
MODEL_QUERIES = {
    "filter": f"SELECT id FROM reviews WHERE LLM_FILTER('{FILTER}', review)",
    "map": f"SELECT id, LLM('{MAP}', review, max_tokens => 4) AS s FROM reviews",
    "classify": "SELECT LLM_CLASSIFY('Sentiment?', labels => ['positive', 'negative'], review) "
                "AS k, COUNT(*) AS n FROM reviews GROUP BY k",
    "extract": "SELECT id, LLM_EXTRACT('Give the review as JSON with its first word.', "
               "schema => 'word VARCHAR', review, max_tokens => 12) AS e FROM reviews",
    "agg": "SELECT movie, LLM_AGG('Summarize the reviews.', review, max_tokens => 4) AS n "
           "FROM reviews GROUP BY movie",
}


SHAPES = [  # query shapes, answered by the rule function
    "SELECT id FROM reviews WHERE LLM_FILTER('Good?', review)",
    "SELECT id, LLM('Say', movie, review) AS s FROM reviews WHERE stars >= 4",
    ("SELECT movie, SUM(CAST(LLM_FILTER('Good?', review) AS INT)) AS n FROM reviews "
    "GROUP BY movie"),
    ("SELECT LLM_CLASSIFY('Kind', labels => ['long', 'short'], review) AS k, COUNT(*) AS n "
    "FROM reviews GROUP BY k"),
    ("SELECT movie, LLM_AGG('Count the reviews', review) AS n FROM reviews "
    "WHERE movie IS NOT NULL GROUP BY movie"),
    "SELECT LLM_AGG('Count the reviews', review) AS n FROM reviews",
    ("SELECT id FROM (SELECT id, LLM_EXTRACT('Extract json', schema => 'word VARCHAR, "
    "n INTEGER', review) AS e FROM reviews) WHERE e.n > 5"),
    """WITH good AS (SELECT id, movie FROM reviews WHERE LLM_FILTER('Good?', review))
       SELECT g.id, m.year FROM good AS g JOIN movies AS m ON g.movie = m.movie
       WHERE g.id IN (SELECT id FROM reviews WHERE LLM_FILTER('Good?', genre, review))""",
    ("SELECT r.id, LLM('Say', m.year, r.review) AS s FROM reviews r JOIN movies m "
    "USING (movie) WHERE r.id < 3"),
    "SELECT movie, LLM('Say', movie) AS d FROM reviews GROUP BY movie",
    "SELECT id, LLM('Say', LLM('Say', review)) AS d FROM reviews",
    "SELECT * FROM reviews WHERE LLM_FILTER('Good?', review) AND stars > 2",
]


def with_tables(con: Any) -> Any:
    """``con`` with REVIEWS and MOVIES registered."""
    con.register("reviews", REVIEWS)
    con.register("movies", MOVIES)
    return con


@contextlib.contextmanager
def rule_sessions(spark: Any) -> Iterator[tuple[Any, Any]]:
    """A DuckDB and a Spark session answered by the deterministic rule function, with the
    shared tables; closed after."""
    duck = with_tables(llmsql.connect(backend=RuleBackend(), progress=False, cache=False))
    sp = with_tables(llmsql.connect(backend=RuleBackend(), progress=False, cache=False,
                                    engine="spark", spark=spark))
    try:
        yield duck, sp
    finally:
        duck.close()
        sp.close()


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_for_port(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-20:]
            pytest.fail("the Spark Connect server exited:\n" + "\n".join(tail))
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.2)
    pytest.fail(f"the Spark Connect server did not listen on port {port} in {timeout:.0f} s")


@contextlib.contextmanager
def connect_server(master: str, log: Path, **conf: str) -> Iterator[str]:
    """A Spark Connect server on ``master`` in its own JVM, on a free port; yields its URL.

    Started as ``$SPARK_HOME/sbin/start-connect-server.sh --wait`` starts it (spark-submit of
    the server class, in the foreground, from a neutral folder), bound to 127.0.0.1, with
    executors that import this checkout. Its log goes to ``log``; it is stopped (SIGTERM,
    then SIGKILL) after.
    """
    pyspark = pytest.importorskip("pyspark",
                                  reason="pyspark is not installed (pip install '.[spark]')")
    home = os.environ.get("SPARK_HOME") or os.path.dirname(pyspark.__file__)
    port = _free_port()
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    settings = {"spark.connect.grpc.binding.address": "127.0.0.1",
                "spark.connect.grpc.binding.port": str(port), "spark.ui.enabled": "false",
                "spark.ui.showConsoleProgress": "false", "spark.sql.shuffle.partitions": "4",
                "spark.executorEnv.PYTHONPATH": path, **conf}
    cmd = [os.path.join(home, "bin", "spark-submit"), "--class",
           "org.apache.spark.sql.connect.service.SparkConnectServer", "--master", master,
           "--name", "llmsql-tests-connect"]
    for key, value in settings.items():
        cmd += ["--conf", f"{key}={value}"]
    # Connect runs Python UDFs with the server's PYSPARK_PYTHON and environment (no
    # spark.pyspark.python, no executorEnv in local mode): the executors import this checkout
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable,
           "PYSPARK_DRIVER_PYTHON": sys.executable, "PYTHONPATH": path}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=log.parent, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        _wait_for_port(proc, port, log, timeout=180)
        yield f"sc://localhost:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


@contextlib.contextmanager
def connect_session(url: str) -> Iterator[Any]:
    """A Spark Connect client session on ``url``; stopped after.

    pyspark marks the whole process as a Connect client (``SPARK_CONNECT_MODE_ENABLED``) and
    leaves the mark after ``stop()``; it is removed after, so later classic sessions of the
    same test process start normally.
    """
    from pyspark.sql import SparkSession

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARK_CONNECT_MODE_ENABLED", "1")
        spark = SparkSession.builder.remote(url).getOrCreate()
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
