"""The SparkSession llmsql runs on, and the SQL settings its queries run under.

Spark sizes a shuffle by ``spark.sql.shuffle.partitions`` (200 by default) unless adaptive
query execution (AQE) coalesces the shuffle's output to the data. AQE is on by default, but
not inside a *persisted* plan: Spark keeps a cached plan's partitioning unless
``spark.sql.optimizer.canChangeCachedPlanOutputPartitioning`` is true, so the persisted
inputs of an LLM call (deduplicated with ``GROUP BY``) came out in 200 partitions, and every
job over them -- field statistics, prefix groups, the layout, the lookup join -- ran 200
tasks, for a 12-row table too.

- :data:`QUERY_CONF` turns AQE and partition coalescing on, inside persisted plans too.
  :func:`query_conf` applies it to any session (a user's included) for the duration of one
  step of a query and restores the session's own values after; a session llmsql builds
  starts with it (:func:`open_session`).
- A session llmsql builds also hides Spark's console progress bars
  (``spark.ui.showConsoleProgress``, a static setting: only at creation), which overwrote
  llmsql's own progress line in the CLI. Spark Connect clients show none unless asked to.

Both work for classic Spark and Spark Connect (``spark.conf`` only, no SparkContext).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from typing import TYPE_CHECKING, Any

from llmsql.errors import ConfigError
from llmsql.executors.spark.layout import is_connect

if TYPE_CHECKING:
    from collections.abc import Iterator

    from pyspark.sql import SparkSession

__all__ = ["OWNED_CONF", "QUERY_CONF", "open_session", "query_conf"]

QUERY_CONF: dict[str, str] = {
    "spark.sql.adaptive.enabled": "true",
    "spark.sql.adaptive.coalescePartitions.enabled": "true",
    "spark.sql.optimizer.canChangeCachedPlanOutputPartitioning": "true",
}
"""Runtime SQL settings every Spark job of a query runs under: shuffles sized to the data."""

OWNED_CONF: dict[str, str] = {"spark.ui.showConsoleProgress": "false", **QUERY_CONF}
"""Settings of the sessions llmsql builds (static ones take effect only at creation)."""


@contextlib.contextmanager
def query_conf(spark: SparkSession) -> Iterator[None]:
    """Run the body under :data:`QUERY_CONF`; restore the session's own settings after.

    A setting the session had not set explicitly is unset again (so it keeps following
    Spark's default); one it had set gets its value back. Other threads using the same
    session meanwhile see these settings too.

    Raises:
        ConfigError: the session refuses one of the settings.
    """
    saved: dict[str, str | None] = {}
    try:
        for key, value in QUERY_CONF.items():
            before = spark.conf.get(key, None)  # None: not set explicitly
            if before != value:
                saved[key] = before
                spark.conf.set(key, value)
        yield
    finally:
        for key, before in saved.items():
            if before is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, before)


def _package_root() -> str:
    return str(pathlib.Path(__file__).resolve().parents[3])  # above llmsql/executors/spark/


def _connect(master: str) -> SparkSession:
    from pyspark.errors import PySparkRuntimeError
    from pyspark.sql import SparkSession

    try:
        return SparkSession.builder.remote(master).getOrCreate()
    except ImportError as exc:  # pyspark without its Connect client (grpcio, ...)
        msg = (
            f"spark={master!r} needs the Spark Connect client: pip install "
            f"'llmsql[spark]' ({exc})"
        )
        raise ConfigError(msg) from None
    except PySparkRuntimeError as exc:  # SESSION_ALREADY_EXIST: a classic SparkContext
        msg = (
            f"cannot attach to Spark Connect at {master}: this process already runs a "
            f"classic SparkSession ({str(exc).splitlines()[0]}); pass that session as "
            "spark=, or stop it first"
        )
        raise ConfigError(
            msg) from None


def _build_session(master: str | None) -> SparkSession:
    """A new session on ``master`` (None: the spark-submit settings) with :data:`OWNED_CONF`."""
    from pyspark.sql import SparkSession

    if master is not None and master.startswith("sc://"):
        return _connect(master)
    builder = SparkSession.builder
    if master is not None:
        builder = builder.master(master).appName("llmsql")
    for key, value in OWNED_CONF.items():
        builder = builder.config(key, value)
    if master is not None and master.startswith("local"):  # executors here: import llmsql
        path = os.pathsep.join(p for p in (_package_root(), os.environ.get("PYTHONPATH")) if p)
        builder = builder.config("spark.executorEnv.PYTHONPATH", path)
    return builder.getOrCreate()


def open_session(spark: Any) -> tuple[SparkSession, bool]:
    """The SparkSession to use and whether llmsql created it (and so stops it).

    Args:
        spark: None (the active session, else one built from the spark-submit settings), a
            master URL (``local[2]``, ``spark://...``, ``sc://...`` for Spark Connect) or a
            SparkSession (classic or Connect). A master URL uses the active session when
            there is one; so does an ``sc://`` URL when that session is a Connect session.
            A classic session llmsql builds has :data:`OWNED_CONF`.

    Raises:
        ConfigError: ``spark`` is none of these, pyspark (or its Connect client, for an
            ``sc://`` URL) is missing, or an ``sc://`` URL is given in a process that runs
            a classic SparkSession.
    """
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        msg = "engine='spark' needs pyspark: pip install 'llmsql[spark]'"
        raise ConfigError(msg) from None
    if spark is None or isinstance(spark, str):
        active = SparkSession.getActiveSession()
        remote = isinstance(spark, str) and spark.startswith("sc://")
        # pyspark hands out the active Connect session for any sc:// URL: use it, do not own it
        if active is not None and (not remote or is_connect(active)):
            return active, False
        return _build_session(spark or None), True
    if hasattr(spark, "sql") and hasattr(spark, "createDataFrame"):
        return spark, False
    msg = f"spark= must be a SparkSession or a master URL, got {type(spark).__name__}"
    raise ConfigError(msg)
