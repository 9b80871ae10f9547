"""The Spark executor: relational parts on Spark SQL, LLM steps on the executors.

For each LLM call (see :mod:`llmsql.planner`):

1. **Inputs.** The call's input query runs as Spark SQL (:func:`spark_sql`), deduplicated by
   Spark (``GROUP BY`` the fields, counting the rows each distinct input stands for).
2. **Field orders.** For a call with several appended fields, the driver chooses every
   distinct input's field order over all of them, as DuckDB does, and the tasks keep those
   orders (:mod:`llmsql.executors.spark.orders`): a row's prompt, so its answer, does not
   depend on its partition. Beyond ``spark.llmsql.maxFieldOrderRows`` distinct inputs (or
   ``maxFieldOrderChars``) each partition chooses, as the call's notes say.
3. **Layout.** Prefix-affinity partitioning (:mod:`llmsql.executors.spark.layout`): rows
   whose prompts share the leading field's value stay in one partition, partitions are
   balanced by estimated tokens, too-heavy groups are split and the split shown in EXPLAIN
   (``spark.llmsql.partitioning=default``: Spark's round-robin instead).
4. **Answers.** ``mapInArrow`` runs :func:`llmsql.executors.spark.worker.answer_partition` on
   every partition: the same LLM step as DuckDB (the optimizer orders the partition's rows),
   answered by the executor's long-lived inference worker. Only the picklable
   :class:`~llmsql.backends.base.BackendSpec` travels, with the result cache's *path* (each
   task opens the file and writes every answered batch, so a retried task or a re-run query
   does not pay twice), the answers this query already has for the call's prompts (e.g. its
   selectivity sample) and, under a budget, each partition's share of it. The output is
   persisted (memory and disk): a lost executor's partitions are recomputed from lineage, so
   no row is lost. One statistics row per partition comes back to the driver, with what the
   task spent and any failure a retry would only repeat (which the driver raises). A call
   with ``adapter =>`` also carries its LoRA adapter's files: executors may not see the
   driver's folder (:mod:`llmsql.executors.spark.adapters`).
5. **Lookup.** The answers become the temp view ``call.lookup``; the final query reads them.
6. **Result.** The final query is checkpointed on the executors (:class:`SparkTable`) before
   the lookups are dropped: ``Result.spark()`` keeps working on it without re-running any
   LLM call, and nothing is collected to the driver until Arrow or pandas is asked for.

A backend *object* (or a dry run, as EXPLAIN uses) cannot be rebuilt on executors: then the
partitions are collected and answered on the driver, partition by partition, which keeps the
layout and its EXPLAIN lines.

Settings, read once from the Spark conf when the session is built: ``spark.llmsql.partitions``
(default: the cluster's default parallelism), ``spark.llmsql.partitioning`` (``affinity`` or
``default``), ``spark.llmsql.maxPrefixGroups`` (100000), ``spark.llmsql.maxFieldOrderRows``
(200000) and ``spark.llmsql.maxFieldOrderChars`` (134217728).

Every Spark job of a query runs with adaptive execution and partition coalescing on,
persisted plans included, so shuffles are sized to the data rather than to
``spark.sql.shuffle.partitions``; a user's session gets its own settings back after each
step (:func:`~llmsql.executors.spark.session.query_conf`).

The session is opened in :mod:`llmsql.executors.spark.session`, the SQL rewrites are in
:mod:`llmsql.executors.spark.sql`, the layout in :mod:`llmsql.executors.spark.layout`,
the driver's field orders in :mod:`llmsql.executors.spark.orders` and the code that runs
on executors in :mod:`llmsql.executors.spark.worker`.

This module is over the 500-line guideline: it is the driver's half of each step above
(inputs, layout, the mapInArrow job, lookup, checkpointed result, cleanup on failure), each
small, in one class that holds the SparkSession they share; the rest is already split out.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
import re
import time
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
from sqlglot import exp

import llmsql.errors as errors
from llmsql.backends.dry_run import DryRunBackend
from llmsql.budget import Budget, Usage
from llmsql.errors import ConfigError, ExecutionError, LLMSQLError, PlanError
from llmsql.executors.spark.adapters import ship_adapters
from llmsql.executors.spark.layout import (
    ORDINAL_COL,
    Layout,
    LayoutPlanner,
    SparkSettings,
    is_connect,
)
from llmsql.executors.spark.orders import field_orders
from llmsql.executors.spark.session import open_session, query_conf
from llmsql.executors.spark.sql import spark_sql
from llmsql.executors.spark.tasks import (
    KNOWN_COLLECT_ROWS,
    PartitionReport,
    known_entries,
    merge_batches,
    merge_stats,
    partition_report,
    partition_sizes,
    task_failure,
)
from llmsql.executors.spark.worker import (
    COUNT_COL,
    STATS_COL,
    StepTask,
    answer_partition,
    local_timestamps,
    restore_keys,
)
from llmsql.plan import ARG_PREFIX, GROUP_PREFIX, RESULT_COL, LLMCall, PromptBatch, QueryPlan
from llmsql.step import StepEnv, adapter_ref, known_answers, remember, result_type, run_call
from llmsql.step.offload import offload_delta, offload_stats

if TYPE_CHECKING:
    from collections.abc import Callable

    from pyspark.sql import DataFrame, SparkSession

    from llmsql.backends.base import BackendSpec
    from llmsql.optimizer.context import PinnedFieldOrders
    from llmsql.stats import CallStats

logger = logging.getLogger(__name__)

PART_COL = "__llmsql_part"
ONE_COL = "__llmsql_one"
READERS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "csv",
           ".json": "json", ".jsonl": "json", ".ndjson": "json"}


# ---- sessions and errors ------------------------------------------------------------------


_REMOTE_ERROR = re.compile(r"llmsql\.errors\.(\w+): (.*)")
_OPTIMIZER_ERROR = re.compile(r"optimizer rule '(\w+)' failed: (.*)")


def _from_spark_error(exc: Exception, *, what: str, call: LLMCall | None = None) -> LLMSQLError:
    """An llmsql error for a Spark failure; errors raised by llmsql on executors keep their type."""
    from pyspark.errors import AnalysisException

    text = str(exc)
    found = _REMOTE_ERROR.findall(text)
    if found:
        name, message = found[-1]
        cls = getattr(errors, name, None)
        rule = _OPTIMIZER_ERROR.match(message)
        if name == "OptimizerError" and rule is not None:
            return errors.OptimizerError(rule.group(2), rule=rule.group(1))
        if isinstance(cls, type) and issubclass(cls, LLMSQLError) and name != "OptimizerError":
            return cls(message)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    if isinstance(exc, AnalysisException):
        where = f"{call.where}: " if call is not None else ""
        hint = f"; check the names in {call.text[:80]}" if call is not None else \
            "; check the query's names"
        return PlanError(f"{where}{first}{hint}", line=call.line if call else None,
                         col=call.col if call else None)
    return ExecutionError(f"{what} failed in Spark: {first}", executor="spark",
                          step=call.id if call else "")


def _pinning(env: StepEnv, pinned: PinnedFieldOrders | None) -> StepEnv:
    """``env`` whose rule context carries ``pinned`` (a task's, or the driver's per-partition
    rules keep those field orders); the memo, known answers and budgets stay shared.
    """
    if pinned is None:
        return env
    rule_ctx = env.rule_ctx
    return dataclasses.replace(
        env, rule_ctx=lambda backend: dataclasses.replace(rule_ctx(backend), pinned=pinned))


def shippable_spec(env: StepEnv, model: str | None) -> BackendSpec | None:
    """The spec executors rebuild the session's backend from, or None when they cannot
    (a backend object or a dry run: those answer on the driver).
    """
    return env.spec_for(model) if env.spec_for is not None else None


# ---- results --------------------------------------------------------------------------------


class SparkTable:
    """A query's result kept in Spark until it is read (:class:`llmsql.Result` wraps it).

    The DataFrame is checkpointed on the executors before the query's lookups are dropped,
    so it stays valid -- and never re-runs an LLM call -- for as long as the SparkSession
    runs. Arrow is collected to the driver on first use only, and once.
    """

    def __init__(self, frame: DataFrame) -> None:
        """Wrap a checkpointed DataFrame."""
        self._frame = frame
        self._table: pa.Table | None = None
        self._rows: int | None = None

    def frame(self) -> DataFrame:
        """The result as a Spark DataFrame."""
        return self._frame

    def to_arrow(self) -> pa.Table:
        """The whole result on the driver (collected once)."""
        if self._table is None:
            self._table = _reading(self._frame.toArrow)
        return self._table

    def head(self, n: int, /) -> pa.Table:
        """The first ``n`` rows (only those are collected)."""
        if self._table is not None:
            return self._table.slice(0, n)
        return _reading(self._frame.limit(n).toArrow)

    def num_rows(self) -> int:
        """The number of rows (counted by Spark, not collected)."""
        if self._table is not None:
            return self._table.num_rows
        if self._rows is None:
            self._rows = int(_reading(self._frame.count))
        return self._rows


def _reading(read: Callable[[], Any]) -> Any:
    try:
        return read()
    except Exception as exc:  # noqa: BLE001 - boundary: Spark failures reading a result
        raise _from_spark_error(exc, what="reading the result") from None


# ---- the executor -------------------------------------------------------------------------


class SparkExecutor:
    """Runs plans on a SparkSession (classic or Spark Connect)."""

    name = "spark"

    def __init__(self, spark: SparkSession, settings: SparkSettings, *, owns: bool) -> None:
        self.spark = spark
        self.settings = settings
        self._owns = owns
        self._lookups: dict[str, DataFrame] = {}
        self._planner = LayoutPlanner(spark, settings)
        self.reports: list[PartitionReport] = []
        """One entry per task of every LLM call run on executors (tests, benchmarks)."""

    @classmethod
    def create(cls, *, spark: Any = None, database: str = ":memory:",
               **options: Any) -> SparkExecutor:
        """Attach to (or start) a SparkSession; see :func:`open_session`.

        Raises:
            ConfigError: a DuckDB database file or an unknown option was given, or the
                session does not answer (e.g. no Spark Connect server at the URL).
        """
        if database != ":memory:":
            msg = (
                "engine='spark' reads tables from the Spark catalog; the "
                "'database' setting applies to engine='duckdb' only"
            )
            raise ConfigError(msg)
        if options:
            msg = f"unknown Spark engine option(s): {', '.join(sorted(options))}"
            raise ConfigError(msg)
        session, owns = open_session(spark)
        try:
            settings = SparkSettings.from_conf(session)
        except LLMSQLError:
            raise
        except Exception as exc:  # noqa: BLE001 - boundary: an unreachable server, a dead JVM
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            where = f" at {spark}" if isinstance(spark, str) else ""
            msg = (
                f"the Spark session{where} does not answer: {first}; check that "
                "the cluster (or Spark Connect server) is running and "
                "reachable"
            )
            raise ConfigError(msg) from None
        return cls(session, settings, owns=owns)

    def close(self) -> None:
        """Drop cached lookups; stop the SparkSession if llmsql started it.

        Safe to call at interpreter exit, when Spark may be gone already.
        """
        try:
            for name in list(self._lookups):
                self._drop(name)
            if self._owns:
                self.spark.stop()
        except Exception as exc:  # noqa: BLE001 - boundary: closing must not raise
            logger.debug("closing the Spark engine: %s", exc)
        self._lookups.clear()
        self._owns = False

    # -- tables ------------------------------------------------------------------------------

    def register(self, name: str, data: Any, /) -> None:
        """Expose a Spark/pandas/polars DataFrame, Arrow table or file path as ``name``."""
        try:
            self._frame(data).createOrReplaceTempView(name)
        except LLMSQLError:
            raise
        except Exception as exc:  # noqa: BLE001 - boundary: whatever pyspark raises for bad input
            msg = (
                f"cannot register {type(data).__name__} as table {name!r}: "
                f"{str(exc).splitlines()[0] if str(exc) else exc!r}"
            )
            raise ConfigError(msg) from None

    def _frame(self, data: Any) -> DataFrame:
        if isinstance(data, (str, os.PathLike)):
            return self._read(os.fspath(data))
        if hasattr(data, "createOrReplaceTempView"):
            frame: DataFrame = data
            return frame
        if type(data).__module__.startswith("polars"):
            data = data.to_arrow()
        return self.spark.createDataFrame(data)

    def _read(self, path: str) -> DataFrame:
        """A parquet/csv/json file or folder, local or on any filesystem Spark reads."""
        suffix = pathlib.PurePosixPath(path.rstrip("/")).suffix.lower()
        fmt = READERS.get(suffix)
        if fmt is None:
            msg = (
                f"cannot tell the format of {path!r}; use a .parquet, .csv "
                "or .json file"
            )
            raise ConfigError(msg)
        # under Spark Connect the server reads the path: it need not exist on this client
        if "://" not in path and not is_connect(self.spark) and not pathlib.Path(path).exists():
            msg = f"file {path!r} does not exist"
            raise ConfigError(msg)
        reader = self.spark.read
        if fmt == "csv":
            reader = reader.option("header", True).option("inferSchema", True)
            if suffix == ".tsv":
                reader = reader.option("sep", "\t")
        frame: DataFrame = getattr(reader, fmt)(path)
        return frame

    # -- queries -----------------------------------------------------------------------------

    def _sql(self, tree: exp.Expression, *, what: str, call: LLMCall | None = None) -> DataFrame:
        try:
            df: DataFrame = self.spark.sql(spark_sql(tree))
            return df
        except LLMSQLError:
            raise
        except Exception as exc:  # noqa: BLE001 - boundary: Spark analysis/parse errors
            raise _from_spark_error(exc, what=what, call=call) from None

    def final(self, plan: QueryPlan, /) -> SparkTable | None:
        """Run the final statement; its checkpointed result for a query, None for DDL.

        The checkpoint is eager: the query runs now (its errors are raised here), and the
        result no longer depends on the lookups the caller drops next.
        """
        with query_conf(self.spark):
            df = self._sql(plan.final, what="the query")
            if not isinstance(plan.final, exp.Query):
                return None
            try:
                return SparkTable(df.localCheckpoint(eager=True))
            except Exception as exc:  # noqa: BLE001 - boundary: runtime failures in Spark
                raise _from_spark_error(exc, what="the query") from None

    def drop_lookups(self, plan: QueryPlan, /) -> None:
        """Drop the plan's lookup views and release their cached answers."""
        for call in plan.calls:
            self._drop(call.lookup)

    def _drop(self, name: str) -> None:
        self.spark.catalog.dropTempView(name)
        cached = self._lookups.pop(name, None)
        if cached is not None:
            cached.unpersist()

    # -- LLM calls ---------------------------------------------------------------------------

    def run_call(self, call: LLMCall, env: StepEnv, /) -> CallStats:
        """Inputs and layout on Spark, answers on the executors (or the driver), lookup view."""
        with query_conf(self.spark):
            return self._run_call(call, env)

    def _run_call(self, call: LLMCall, env: StepEnv) -> CallStats:
        from pyspark import StorageLevel

        start = time.perf_counter()
        inputs = self._inputs(call).persist(StorageLevel.MEMORY_AND_DISK)
        try:
            orders = field_orders(call, inputs, env.rule_ctx(DryRunBackend()), self.settings,
                                  self._time_zone())
            env = _pinning(env, orders.pinned)
            layout = self._planner.layout(call, inputs)
            input_seconds = time.perf_counter() - start
            spec = shippable_spec(env, call.options.model)
            try:
                if spec is None:
                    stats = self._answer_on_driver(call, layout, env)
                else:
                    stats = self._answer_on_executors(call, layout, spec, env,
                                                      self._prompts(call, layout, inputs))
            except LLMSQLError:
                raise
            except Exception as exc:  # noqa: BLE001 - boundary: task failures come back as Spark errors
                raise _from_spark_error(exc, what=f"answering {call.where}", call=call) from None
        finally:
            inputs.unpersist()
        stats.input_seconds = input_seconds
        stats.seconds = time.perf_counter() - start
        stats.notes = (*layout.notes, *orders.notes, *stats.notes)
        return stats

    @staticmethod
    def _prompts(call: LLMCall, layout: Layout, inputs: DataFrame) -> int | None:
        """The distinct prompts a call will send, known before answering (for the progress
        bar): one per distinct input; None for LLM_AGG (map-reduce adds prompts).
        """
        if call.kind.spec.aggregate:
            return None
        return layout.rows if layout.rows is not None else int(inputs.count())

    def _inputs(self, call: LLMCall) -> DataFrame:
        """The call's inputs: distinct field tuples with row counts (all rows for LLM_AGG)."""
        from pyspark.sql import functions as F

        rows = self._sql(call.input, what=f"computing the inputs of {call.where}", call=call)
        if call.kind.spec.aggregate:
            return rows.withColumn(ORDINAL_COL, F.monotonically_increasing_id())
        args = [c for c in rows.columns if c.startswith(ARG_PREFIX)]
        return rows.groupBy(*args).agg(F.count(F.lit(1)).alias(COUNT_COL))

    # -- answering ---------------------------------------------------------------------------

    def _lookup_schema(self, call: LLMCall, inputs_schema: Any) -> Any:
        from pyspark.sql import types as T
        from pyspark.sql.pandas.types import from_arrow_type

        if call.kind.spec.aggregate:
            keys = [f for f in inputs_schema.fields if f.name.startswith(GROUP_PREFIX)]
            fields = keys or [T.StructField(ONE_COL, T.BooleanType())]
        else:
            fields = [f for f in inputs_schema.fields if f.name.startswith(ARG_PREFIX)]
        result = T.StructField(RESULT_COL, from_arrow_type(result_type(call)))
        return T.StructType([*fields, result])

    def _time_zone(self) -> str:
        return str(self.spark.conf.get("spark.sql.session.timeZone", "UTC") or "UTC")

    def _answer_on_executors(self, call: LLMCall, layout: Layout, spec: BackendSpec,
                             env: StepEnv, prompts: int | None) -> CallStats:
        """Answer on the executors; llmsql's progress bar (not Spark's) shows the call from
        the start when its prompts are known, and its totals when the tasks are done.
        """
        from pyspark import StorageLevel
        from pyspark.sql import functions as F

        if prompts is not None:
            env.progress.start(prompts, call.where)
        df = layout.df
        if env.budget is not None:  # the shares' estimates and the answers see one layout
            df = df.persist(StorageLevel.MEMORY_AND_DISK)
        try:
            task, left = self._task(call, df, layout.lead, spec, env)
            mapped = df.mapInArrow(functools.partial(answer_partition, task),
                                   self._out_schema(call, df.schema))
            cached = mapped.persist(StorageLevel.MEMORY_AND_DISK)
            self._lookups[call.lookup] = cached
            parts = [json.loads(r[0]) for r in
                     cached.where(F.col(STATS_COL).isNotNull()).select(STATS_COL).collect()]
        finally:
            if df is not layout.df:
                df.unpersist()
        self._settle(call, env, parts, left)
        lookup = cached.where(F.col(STATS_COL).isNull()).drop(STATS_COL)
        if call.kind.spec.aggregate:
            # The rows' scan order (monotonically_increasing_id) is non-deterministic for
            # Spark, which then refuses the lookup inside ANY_VALUE: cut the lineage (one
            # row per group, small).
            lookup = lookup.localCheckpoint(eager=True)
        lookup.createOrReplaceTempView(call.lookup)
        self._share_answers(call, env, parts, lookup)
        self.reports += [partition_report(call, p) for p in parts]
        stats = merge_stats(call, parts)
        if prompts is None:
            env.progress.start(stats.distinct_prompts, call.where)
        env.progress.advance(stats.distinct_prompts, stats.prompt_tokens + stats.output_tokens,
                             None if stats.cache_unreported else stats.cached_tokens)
        return stats

    def _out_schema(self, call: LLMCall, inputs_schema: Any) -> Any:
        """The lookup's columns, then the statistics column."""
        from pyspark.sql import types as T

        schema = self._lookup_schema(call, inputs_schema)
        return T.StructType([*schema.fields, T.StructField(STATS_COL, T.StringType())])

    def _task(self, call: LLMCall, df: DataFrame, lead: str | None, spec: BackendSpec,
              env: StepEnv) -> tuple[StepTask, Budget | None]:
        """What every task of ``call`` gets, and what was left of the budgets (if any)."""
        from pyspark.sql.pandas.types import to_arrow_schema

        large = str(self.spark.conf.get("spark.sql.execution.arrow.useLargeVarTypes",
                                        "false")).lower() == "true"
        tz = self._time_zone()
        out = to_arrow_schema(self._out_schema(call, df.schema), timezone=tz,
                              prefers_large_types=large)
        budgets = price = left = None
        if env.budget is not None:
            left = env.budget.left()
            price = env.budget.price(call.options.model)
            sizes = partition_sizes(call, df)
            budgets = tuple(env.budget.shares(sizes, call.options.model))
        known = known_answers(call, env.known) if not call.kind.spec.aggregate else ()
        cache = str(env.cache.path) if env.cache is not None else None
        task = StepTask(call, spec, env.rule_ctx(DryRunBackend()), out, tz, lead,
                        env.on_error, cache_path=cache, known=known, budgets=budgets,
                        price=price, adapters=ship_adapters([adapter_ref(call, env.adapters)]))
        return task, left

    def _settle(self, call: LLMCall, env: StepEnv, parts: list[dict[str, Any]],
                left: Budget | None) -> None:
        """Charge what the tasks spent to the query's budgets; raise what a task reported."""
        if env.budget is not None:
            for p in parts:
                if p.get("used"):
                    env.budget.charge(Usage(**p["used"]))
        failed = [p for p in parts if p.get("error")]
        if failed:
            raise task_failure(call, env, failed, len(parts), left)

    def _share_answers(self, call: LLMCall, env: StepEnv, parts: list[dict[str, Any]],
                       lookup: DataFrame) -> None:
        """Keep a small call's answers for later calls of the query with the same prompts."""
        distinct = sum(int(p["stats"].get("rows_in", 0)) for p in parts)
        model = next((p["model_id"] for p in parts if p.get("model_id")), None)
        if (call.kind.spec.aggregate or call.stop_after is not None or model is None
                or not 0 < distinct <= KNOWN_COLLECT_ROWS):
            return
        table = _reading(lookup.toArrow)
        remember(call, model, known_entries(call, table, self._time_zone()), env.known)

    def _answer_on_driver(self, call: LLMCall, layout: Layout, env: StepEnv) -> CallStats:
        """Backend objects and dry runs: collect the partitions, answer them here."""
        from pyspark.sql import functions as F

        schema = self._lookup_schema(call, layout.df.schema)
        table = layout.df.withColumn(PART_COL, F.spark_partition_id()).toArrow()
        seen: list[tuple[PromptBatch, tuple[int, ...]]] = []
        local = dataclasses.replace(env, on_batch=lambda b, rows: seen.append((b, rows)))
        lookups, parts = [], []
        for p in sorted(set(table.column(PART_COL).to_pylist())):
            part = table.filter(pc.equal(table.column(PART_COL), p))
            rows = part.column(COUNT_COL).to_pylist() if COUNT_COL in part.column_names else None
            step = part.select([c for c in part.column_names
                                if c.startswith((ARG_PREFIX, GROUP_PREFIX))])
            rendered = local_timestamps(step, self._time_zone())
            before = offload_stats(local.backend_for(call.options.model))
            lookup, stats = run_call(call, rendered, local)
            moe = offload_delta(local.backend_for(call.options.model), before)
            lookups.append(restore_keys(call, step, rendered, lookup))
            parts.append({"stats": dataclasses.asdict(stats),
                          "rows": sum(rows) if rows is not None else part.num_rows,
                          "moe": dataclasses.asdict(moe) if moe is not None else None})
        if env.on_batch is not None and seen:
            env.on_batch(*merge_batches(seen))
        self._register_lookup(call, lookups, schema)
        stats = merge_stats(call, parts)
        stats.notes = (*stats.notes, ("answered on the driver (a backend object or a dry run "
                                     "cannot be rebuilt on executors)"))
        return stats

    def _register_lookup(self, call: LLMCall, lookups: list[pa.Table], schema: Any) -> None:
        from pyspark.sql.pandas.types import to_arrow_schema

        target = to_arrow_schema(schema, timezone=self._time_zone())
        if lookups:
            table = pa.concat_tables([t.select(target.names) for t in lookups]).cast(target)
        else:
            table = target.empty_table()
        df = self.spark.createDataFrame(table, schema=schema) if table.num_rows else \
            self.spark.createDataFrame([], schema)
        df.createOrReplaceTempView(call.lookup)


__all__ = ["PartitionReport", "SparkExecutor", "SparkSettings", "SparkTable", "merge_stats",
           "open_session", "shippable_spec"]
