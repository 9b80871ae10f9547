"""The Spark executor: relational parts on Spark SQL, LLM steps on the executors.

For each LLM call (see :mod:`llmsql.planner`):

1. **Inputs.** The call's input query runs as Spark SQL (:func:`spark_sql`), deduplicated by
   Spark (``GROUP BY`` the fields, counting the rows each distinct input stands for).
2. **Layout.** Prefix-affinity partitioning (:mod:`llmsql.executors.spark_layout`): rows
   whose prompts share the leading field's value stay in one partition, partitions are
   balanced by estimated tokens, too-heavy groups are split and the split shown in EXPLAIN
   (``spark.llmsql.partitioning=default``: Spark's round-robin instead).
3. **Answers.** ``mapInArrow`` runs :func:`llmsql.executors.spark_worker.answer_partition` on
   every partition: the same LLM step as DuckDB (the optimizer orders the partition's rows),
   answered by the executor's long-lived inference worker. Only the picklable
   :class:`~llmsql.backends.base.BackendSpec` travels. The output is persisted (memory and
   disk): a lost executor's partitions are recomputed from lineage, so no row is lost. One
   statistics row per partition comes back to the driver.
4. **Lookup.** The answers become the temp view ``call.lookup``; the final query reads them.

A backend *object* (or a dry run, as EXPLAIN uses) cannot be rebuilt on executors: then the
partitions are collected and answered on the driver, partition by partition, which keeps the
layout and its EXPLAIN lines.

Settings, read once from the Spark conf when the session is built: ``spark.llmsql.partitions``
(default: the cluster's default parallelism), ``spark.llmsql.partitioning`` (``affinity`` or
``default``), ``spark.llmsql.maxPrefixGroups`` (100000).

The SQL rewrites are in :mod:`llmsql.executors.spark_sql`, the layout in
:mod:`llmsql.executors.spark_layout` and the code that runs on executors in
:mod:`llmsql.executors.spark_worker`.
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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
from sqlglot import exp

from llmsql import errors
from llmsql.backends.base import BackendSpec
from llmsql.backends.dry_run import DryRunBackend
from llmsql.errors import ConfigError, ExecutionError, LLMSQLError, PlanError, UnsupportedError
from llmsql.executors.llm_step import CallStats, StepEnv, result_type, run_call
from llmsql.executors.spark_layout import ORDINAL_COL, Layout, LayoutPlanner, SparkSettings
from llmsql.executors.spark_sql import spark_sql
from llmsql.executors.spark_worker import (
    COUNT_COL,
    STATS_COL,
    StepTask,
    answer_partition,
    local_timestamps,
    restore_keys,
)
from llmsql.plan import ARG_PREFIX, GROUP_PREFIX, RESULT_COL, LLMCall, PromptBatch, QueryPlan
from llmsql.udfs.base import CallKind

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

logger = logging.getLogger(__name__)

PART_COL = "__llmsql_part"
ONE_COL = "__llmsql_one"
READERS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "csv",
           ".json": "json", ".jsonl": "json", ".ndjson": "json"}


@dataclass(frozen=True, slots=True)
class PartitionReport:
    """What one task of an LLM call did (from its statistics row)."""

    call_id: str
    partition: int
    executor: str
    worker_pid: int
    model_loads: int
    rows: int
    prompt_tokens: int
    cached_tokens: int
    lead_values: tuple[str, ...] | None
    worker: dict[str, Any]
    """The worker's cumulative counters after the task (:class:`WorkerStats` fields)."""


# ---- sessions and errors ------------------------------------------------------------------


def _package_root() -> str:
    return str(pathlib.Path(__file__).resolve().parents[2])


def _build_session(master: str) -> SparkSession:
    from pyspark.sql import SparkSession

    if master.startswith("sc://"):
        return SparkSession.builder.remote(master).getOrCreate()
    builder = SparkSession.builder.master(master).appName("llmsql")
    if master.startswith("local"):  # executors on this machine: let them import llmsql
        path = os.pathsep.join(p for p in (_package_root(), os.environ.get("PYTHONPATH")) if p)
        builder = builder.config("spark.executorEnv.PYTHONPATH", path)
    return builder.getOrCreate()


def open_session(spark: Any) -> tuple[SparkSession, bool]:
    """The SparkSession to use and whether llmsql created it (and so stops it).

    Args:
        spark: None (the active session, else one built from the spark-submit settings), a
            master URL (``local[2]``, ``spark://...``, ``sc://...`` for Spark Connect) or a
            SparkSession (classic or Connect).

    Raises:
        ConfigError: ``spark`` is none of these, or pyspark is missing.
    """
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise ConfigError("engine='spark' needs pyspark: pip install 'llmsql[spark]'") from None
    if spark is None or isinstance(spark, str):
        active = SparkSession.getActiveSession()
        if active is not None and not (isinstance(spark, str) and spark.startswith("sc://")):
            return active, False
        return (_build_session(spark) if spark else SparkSession.builder.getOrCreate()), True
    if hasattr(spark, "sql") and hasattr(spark, "createDataFrame"):
        return spark, False
    raise ConfigError(f"spark= must be a SparkSession or a master URL, got {type(spark).__name__}")


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


def shippable_spec(env: StepEnv, model: str | None) -> BackendSpec | None:
    """The spec executors rebuild the session's backend from, or None when they cannot
    (a backend object or a dry run: those answer on the driver)."""
    return env.spec_for(model) if env.spec_for is not None else None


# ---- statistics -----------------------------------------------------------------------------


def merge_stats(call: LLMCall, parts: Sequence[dict[str, Any]]) -> CallStats:
    """One call's statistics from its partitions' statistics rows."""
    out = CallStats(call.id, call.kind.value, call.where)
    skip = {"call_id", "kind", "where", "notes", "null_reasons", "rule_seconds", "seconds",
            "input_seconds", "generate_seconds", "rows_in"}
    for f in dataclasses.fields(CallStats):
        current = getattr(out, f.name)
        if f.name in skip or isinstance(current, bool) or not isinstance(current, (int, float)):
            continue
        setattr(out, f.name, type(current)(sum(p["stats"].get(f.name, 0) for p in parts)))
    out.rows_in = sum(int(p["rows"]) for p in parts)
    out.generate_seconds = max((p["stats"].get("generate_seconds", 0.0) for p in parts),
                               default=0.0)
    rules: dict[str, float] = {}
    for p in parts:
        for name, seconds in p["stats"].get("rule_seconds", ()):
            rules[name] = rules.get(name, 0.0) + seconds
    out.rule_seconds = tuple(rules.items())
    out.null_reasons = [r for p in parts for r in p["stats"].get("null_reasons", ())][:20]
    if parts:
        biggest = max(parts, key=lambda p: p["rows"])
        suffix = f" [largest of {len(parts)} partitions]" if len(parts) > 1 else ""
        out.notes = tuple(f"{n}{suffix}" for n in biggest["stats"].get("notes", ()))
    return out


def _report(call: LLMCall, p: dict[str, Any]) -> PartitionReport:
    w = p["worker"]
    lead = p.get("lead")
    return PartitionReport(call.id, int(p["partition"]), str(p["executor"]), int(w["pid"]),
                           int(w["model_loads"]), int(p["rows"]),
                           int(p["stats"]["prompt_tokens"]), int(p["stats"]["cached_tokens"]),
                           tuple(lead) if lead is not None else None, dict(w))


def _index_of(items: list[tuple[int, ...]], item: tuple[int, ...]) -> int:
    """The position of ``item`` in ``items``, appending it first when missing."""
    if item not in items:
        items.append(item)
    return items.index(item)


def _merge_batches(items: Sequence[tuple[PromptBatch, tuple[int, ...]]],
                   ) -> tuple[PromptBatch, tuple[int, ...]]:
    """Several partitions' optimized batches of one call as one batch (for EXPLAIN)."""
    first = items[0][0]
    written = first.call.template.appended
    values = tuple(tuple(v for b, _ in items for v in b.values[j])
                   for j in range(len(first.values)))
    rep: list[int] = []
    order: list[int] = []
    sent: list[int] = []
    bounds: list[int] = []
    orders: list[tuple[int, ...]] = []
    per_row: list[int] = []
    warm: list[tuple[int, int]] = []
    offset = 0
    for b, rows in items:
        fos = b.field_orders if b.row_field_order is not None else (written,)
        local = [_index_of(orders, fo) for fo in fos]
        per_row += [local[b.row_field_order[i]] if b.row_field_order else local[0]
                    for i in range(b.n_rows)]
        bounds += [len(order) + x for x in b.batches]
        rep += [offset + r for r in (b.rep or range(b.n_rows))]
        order += [offset + i for i in b.send_order()]
        sent += [offset + i for i in rows]
        warm += [(offset + r, chars) for r, chars in b.warmups]
        offset += b.n_rows
    merged = dataclasses.replace(
        first, values=values, n_rows=offset, rep=tuple(rep), order=tuple(order),
        field_orders=tuple(orders), row_field_order=tuple(per_row), batches=tuple(bounds),
        warmups=tuple(warm), rendered=None)
    return merged, tuple(sent)


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
            ConfigError: a DuckDB database file or an unknown option was given.
        """
        if database != ":memory:":
            raise ConfigError("engine='spark' reads tables from the Spark catalog; the "
                              "'database' setting applies to engine='duckdb' only")
        if options:
            raise ConfigError(f"unknown Spark engine option(s): {', '.join(sorted(options))}")
        session, owns = open_session(spark)
        return cls(session, SparkSettings.from_conf(session), owns=owns)

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
            raise ConfigError(f"cannot register {type(data).__name__} as table {name!r}: "
                              f"{str(exc).splitlines()[0] if str(exc) else exc!r}") from None

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
            raise ConfigError(f"cannot tell the format of {path!r}; use a .parquet, .csv "
                              "or .json file")
        if "://" not in path and not pathlib.Path(path).exists():
            raise ConfigError(f"file {path!r} does not exist")
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

    def final(self, plan: QueryPlan, /) -> pa.Table | None:
        """Run the final statement; Arrow for a query, None for DDL."""
        df = self._sql(plan.final, what="the query")
        if not isinstance(plan.final, exp.Query):
            return None
        try:
            return df.toArrow()
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
        from pyspark import StorageLevel

        start = time.perf_counter()
        inputs = self._inputs(call).persist(StorageLevel.MEMORY_AND_DISK)
        try:
            layout = self._planner.layout(call, inputs)
            input_seconds = time.perf_counter() - start
            spec = shippable_spec(env, call.options.model)
            if spec is not None and getattr(env, "budget", None) is not None:
                raise UnsupportedError(
                    f"{call.where}: query budgets (SET llmsql.max_...) are not enforced on "
                    "Spark executors yet; clear them, or run this query with engine='duckdb'")
            try:
                if spec is None:
                    stats = self._answer_on_driver(call, layout, env)
                else:
                    stats = self._answer_on_executors(call, layout, spec, env)
            except LLMSQLError:
                raise
            except Exception as exc:  # noqa: BLE001 - boundary: task failures come back as Spark errors
                raise _from_spark_error(exc, what=f"answering {call.where}", call=call) from None
        finally:
            inputs.unpersist()
        stats.input_seconds = input_seconds
        stats.seconds = time.perf_counter() - start
        stats.notes = (*layout.notes, *stats.notes)
        return stats

    def _inputs(self, call: LLMCall) -> DataFrame:
        """The call's inputs: distinct field tuples with row counts (all rows for LLM_AGG)."""
        from pyspark.sql import functions as F

        rows = self._sql(call.input, what=f"computing the inputs of {call.where}", call=call)
        if call.kind is CallKind.AGG:
            return rows.withColumn(ORDINAL_COL, F.monotonically_increasing_id())
        args = [c for c in rows.columns if c.startswith(ARG_PREFIX)]
        return rows.groupBy(*args).agg(F.count(F.lit(1)).alias(COUNT_COL))

    # -- answering ---------------------------------------------------------------------------

    def _lookup_schema(self, call: LLMCall, inputs_schema: Any) -> Any:
        from pyspark.sql import types as T
        from pyspark.sql.pandas.types import from_arrow_type

        if call.kind is CallKind.AGG:
            keys = [f for f in inputs_schema.fields if f.name.startswith(GROUP_PREFIX)]
            fields = keys or [T.StructField(ONE_COL, T.BooleanType())]
        else:
            fields = [f for f in inputs_schema.fields if f.name.startswith(ARG_PREFIX)]
        result = T.StructField(RESULT_COL, from_arrow_type(result_type(call)))
        return T.StructType([*fields, result])

    def _time_zone(self) -> str:
        return str(self.spark.conf.get("spark.sql.session.timeZone", "UTC") or "UTC")

    def _answer_on_executors(self, call: LLMCall, layout: Layout, spec: BackendSpec,
                             env: StepEnv) -> CallStats:
        from pyspark import StorageLevel
        from pyspark.sql import functions as F
        from pyspark.sql import types as T
        from pyspark.sql.pandas.types import to_arrow_schema

        schema = self._lookup_schema(call, layout.df.schema)
        out = T.StructType([*schema.fields, T.StructField(STATS_COL, T.StringType())])
        large = str(self.spark.conf.get("spark.sql.execution.arrow.useLargeVarTypes",
                                        "false")).lower() == "true"
        tz = self._time_zone()
        task = StepTask(call, spec, env.rule_ctx(DryRunBackend()),
                        to_arrow_schema(out, timezone=tz, prefers_large_types=large), tz,
                        layout.lead, env.on_error)
        mapped = layout.df.mapInArrow(functools.partial(answer_partition, task), out)
        cached = mapped.persist(StorageLevel.MEMORY_AND_DISK)
        self._lookups[call.lookup] = cached
        parts = [json.loads(r[0]) for r in
                 cached.where(F.col(STATS_COL).isNotNull()).select(STATS_COL).collect()]
        lookup = cached.where(F.col(STATS_COL).isNull()).drop(STATS_COL)
        if call.kind is CallKind.AGG:
            # The rows' scan order (monotonically_increasing_id) is non-deterministic for
            # Spark, which then refuses the lookup inside ANY_VALUE: cut the lineage (one
            # row per group, small).
            lookup = lookup.localCheckpoint(eager=True)
        lookup.createOrReplaceTempView(call.lookup)
        self.reports += [_report(call, p) for p in parts]
        stats = merge_stats(call, parts)
        env.progress.start(stats.distinct_prompts, call.where)
        env.progress.advance(stats.distinct_prompts, stats.prompt_tokens + stats.output_tokens,
                             stats.cached_tokens)
        return stats

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
            lookup, stats = run_call(call, rendered, local)
            lookups.append(restore_keys(call, step, rendered, lookup))
            parts.append({"stats": dataclasses.asdict(stats),
                          "rows": sum(rows) if rows is not None else part.num_rows})
        if env.on_batch is not None and seen:
            env.on_batch(*_merge_batches(seen))
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


__all__ = ["PartitionReport", "SparkExecutor", "SparkSettings", "merge_stats", "open_session",
           "shippable_spec"]
