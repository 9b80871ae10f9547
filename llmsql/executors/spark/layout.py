"""Where an LLM call's inputs go on a cluster: prefix-affinity layout of a Spark DataFrame.

:class:`LayoutPlanner` turns a call's distinct inputs into a DataFrame partitioned for the
executors' inference workers (see :mod:`llmsql.executors.spark.executor`):

1. One Spark job measures, per field, how many characters its repeated values could share,
   and picks the leading field the way the optimizer ranks fields
   (:func:`llmsql.executors.spark.partition.field_priority`); a ``{placeholder}`` template leads
   with its first placeholder.
2. A second job counts rows and estimated tokens per value of that field: the *prefix
   groups*. Only the groups, not the rows, are collected on the driver (beyond
   ``max_groups`` of them, range partitioning on the field, which also keeps equal values
   together).
3. :func:`llmsql.executors.spark.partition.plan_partitions` balances the groups over the
   partitions by tokens and splits a group too heavy for one partition; a third job (only
   then) finds the split group's next varying field, and its rows are spread by a hash of it.
4. Rows are routed with ``repartition(n, key)``, each key chosen so that Spark's own
   ``pmod(hash(key), n)`` is the planned partition.

LLM_AGG groups (the GROUP BY keys) are never split, and keep their rows' scan order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from llmsql.errors import ConfigError
from llmsql.executors.spark.partition import (
    DEFAULT_SLACK,
    Group,
    PartitionPlan,
    describe,
    field_priority,
    plan_partitions,
)
from llmsql.plan import ARG_PREFIX, GROUP_PREFIX, LLMCall

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pyspark.sql import Column, DataFrame, SparkSession

__all__ = ["CHARS_PER_TOKEN", "ORDINAL_COL", "Layout", "LayoutPlanner", "SparkSettings",
           "is_connect"]

CONF_PREFIX = "spark.llmsql."
ORDINAL_COL = "__llmsql_ord"
"""LLM_AGG inputs: the row's position in the input query's output (its scan order)."""
KEY_COL = "__llmsql_key"
PK_COL = "__llmsql_pk"
CHARS_COL = "__llmsql_chars"
CHARS_PER_TOKEN = 4
MAX_FIELD_ORDER_ROWS = 200_000
MAX_FIELD_ORDER_CHARS = 128 * 2**20
"""Defaults of ``spark.llmsql.maxFieldOrderRows`` / ``maxFieldOrderChars``: what the driver
collects at most to choose a multi-field call's field orders as DuckDB does. Measured on this
project's solver: 200,000 climate_fever rows (64 M characters) take about 4 s on the driver
(rules and pins) and ship 2.5 MB of pins per task; 128 M characters stay well inside Spark's
default 1 GB ``spark.driver.maxResultSize`` and driver memory, counting the Arrow copy and the
rendered Python strings."""


def is_connect(obj: object) -> bool:
    """True for a Spark Connect object (session, DataFrame or Column): no SparkContext, no
    JVM handles (``sparkContext``, ``_jdf``, ``_jc``) on the client.
    """
    return type(obj).__module__.startswith("pyspark.sql.connect.")


@dataclass(frozen=True, slots=True)
class SparkSettings:
    """How the Spark executor lays out LLM work (read once from ``spark.llmsql.*``)."""

    partitioning: Literal["affinity", "default"] = "affinity"
    """``affinity``: prefix groups kept together, balanced by tokens; ``default``: round-robin."""
    partitions: int | None = None
    """Partitions per LLM call (None: the cluster's default parallelism)."""
    max_groups: int = 100_000
    """Prefix groups collected on the driver at most; beyond, range partitioning."""
    slack: float = DEFAULT_SLACK
    """A group may exceed the per-partition token target by this share before it is split."""
    max_field_order_rows: int = MAX_FIELD_ORDER_ROWS
    """A multi-field call's distinct inputs collected on the driver at most, to choose every
    row's field order over all of them as DuckDB does (:mod:`llmsql.executors.spark.orders`);
    beyond, each partition chooses over its own rows."""
    max_field_order_chars: int = MAX_FIELD_ORDER_CHARS
    """The same, in characters of the inputs' field values (estimated by Spark)."""

    @classmethod
    def from_conf(cls, spark: SparkSession) -> SparkSettings:
        """Read ``spark.llmsql.partitioning``, ``.partitions``, ``.maxPrefixGroups``,
        ``.maxFieldOrderRows`` and ``.maxFieldOrderChars``.

        Raises:
            ConfigError: a value is malformed.
        """
        mode = str(spark.conf.get(CONF_PREFIX + "partitioning", "affinity")).lower()
        if mode not in ("affinity", "default"):
            msg = (
                f"{CONF_PREFIX}partitioning must be 'affinity' or 'default', "
                f"got {mode!r}"
            )
            raise ConfigError(msg)
        try:
            parts = spark.conf.get(CONF_PREFIX + "partitions", None)
            groups = int(spark.conf.get(CONF_PREFIX + "maxPrefixGroups", "100000") or 100000)
            n = int(parts) if parts else None
        except ValueError as exc:
            msg = f"{CONF_PREFIX}partitions / maxPrefixGroups: {exc}"
            raise ConfigError(msg) from None
        if n is not None and n < 1:
            msg = f"{CONF_PREFIX}partitions must be at least 1, got {n}"
            raise ConfigError(msg)
        return cls(partitioning=mode, partitions=n, max_groups=groups,  # type: ignore[arg-type]
                   max_field_order_rows=_limit(spark, "maxFieldOrderRows", MAX_FIELD_ORDER_ROWS),
                   max_field_order_chars=_limit(spark, "maxFieldOrderChars",
                                                 MAX_FIELD_ORDER_CHARS))


def _limit(spark: SparkSession, key: str, default: int) -> int:
    """The non-negative integer setting ``spark.llmsql.<key>`` (0: never).

    Raises:
        ConfigError: it is not a non-negative integer.
    """
    text = spark.conf.get(CONF_PREFIX + key, None)
    try:
        value = int(text) if text else default
    except ValueError:
        value = -1
    if value < 0:
        msg = (
            f"{CONF_PREFIX}{key} must be a whole number of at least 0, "
            f"got {text!r}"
        )
        raise ConfigError(msg)
    return value


@dataclass(frozen=True, slots=True)
class Layout:
    """A call's inputs laid out for the executors, with the EXPLAIN lines saying how."""

    df: DataFrame
    notes: tuple[str, ...]
    lead: str | None = None
    """The leading field's input column (reported per partition), when grouped on one."""
    rows: int | None = None
    """The input rows laid out, when the layout counted them (prefix groups)."""


class LayoutPlanner:
    """Plans and applies the partition layout of LLM calls on one SparkSession."""

    def __init__(self, spark: SparkSession, settings: SparkSettings) -> None:
        self.spark = spark
        self.settings = settings
        self._pks: dict[int, list[int]] = {}

    def n_partitions(self) -> int:
        """Partitions per LLM call."""
        if self.settings.partitions is not None:
            return self.settings.partitions
        if not is_connect(self.spark):
            return max(1, int(self.spark.sparkContext.defaultParallelism))
        return self._connect_parallelism()

    def _connect_parallelism(self) -> int:
        """The default parallelism through Spark Connect, which has no SparkContext: a range
        without a partition count gets it (``spark.sql.leafNodeDefaultParallelism``, else
        the cluster's default parallelism). One small Spark job.
        """
        from pyspark.sql import functions as F

        row = (self.spark.range(0, 1 << 16).select(F.spark_partition_id().alias("p"))
               .agg(F.max("p").alias("p")).first())
        return max(1, int(row["p"]) + 1) if row is not None and row["p"] is not None else 1

    # -- layout ------------------------------------------------------------------------------

    def layout(self, call: LLMCall, inputs: DataFrame) -> Layout:
        """Partition ``call``'s inputs for the executors (see the module docstring)."""
        n = self.n_partitions()
        if call.kind.spec.aggregate:
            return self._agg_layout(call, inputs, n)
        if self.settings.partitioning == "default" or not call.fields:
            return Layout(inputs.repartition(n), (
                f"spark partitioning: Spark's round-robin over {n} partition(s)",))
        order = self._field_order(call, inputs)
        if order is None:
            return Layout(inputs.repartition(n), (
                ("spark partitioning: no field value repeats, round-robin over "
                f"{n} partition(s)"),))
        return self._affinity(call, inputs, order, n)

    def _agg_layout(self, call: LLMCall, inputs: DataFrame, n: int) -> Layout:
        keys = [c for c in inputs.columns if c.startswith(GROUP_PREFIX)]
        if not keys:
            return Layout(inputs.repartition(1).sortWithinPartitions(ORDINAL_COL),
                           ("spark partitioning: one group, one partition",))
        layout = self._place_groups(inputs, keys, [], n, splittable=False,
                                    names=[k.sql() for k in call.group_keys])
        return Layout(layout.df.sortWithinPartitions(ORDINAL_COL), layout.notes)

    def _field_order(self, call: LLMCall, inputs: DataFrame) -> list[int] | None:
        """Field indexes in the order the optimizer would put them first (None: no sharing)."""
        template = call.template
        if template.order_is_fixed:
            first = template.fields.index(template.placeholders[0])
            return [first, *[j for j in range(len(template.fields)) if j != first]]
        saved = self._saved_chars(call, inputs)
        if not any(saved):
            return None
        return list(field_priority(saved))

    def _saved_chars(self, call: LLMCall, inputs: DataFrame) -> list[int]:
        """Per field: characters its repeated values could share (one Spark job)."""
        from pyspark.sql import functions as F

        parts = []
        for j, f in enumerate(call.fields):
            col = f"{ARG_PREFIX}{j}"
            line = F.length(F.coalesce(F.col(col).cast("string"), F.lit(""))) + len(f.name) + 3
            per_value = inputs.groupBy(col).agg(F.count(F.lit(1)).alias("c"),
                                                F.max(line).alias("w"))
            parts.append(per_value.select(F.lit(j).alias("j"),
                                          ((F.col("c") - 1) * F.col("w")).alias("s")))
        union = functools.reduce(lambda a, b: a.unionByName(b), parts)
        got = {r["j"]: int(r["s"] or 0) for r in union.groupBy("j").agg(F.sum("s").alias("s"))
               .collect()}
        return [got.get(j, 0) for j in range(len(call.fields))]

    def _prompt_chars(self, call: LLMCall) -> Column:
        from pyspark.sql import functions as F

        head = len(call.template.instruction) + 1
        lines = [F.length(F.coalesce(F.col(f"{ARG_PREFIX}{j}").cast("string"), F.lit("")))
                 + len(f.name) + 3 for j, f in enumerate(call.fields)]
        return functools.reduce(lambda a, b: a + b, lines, F.lit(head))

    def _affinity(self, call: LLMCall, inputs: DataFrame, order: list[int], n: int) -> Layout:
        lead = f"{ARG_PREFIX}{order[0]}"
        rest = [f"{ARG_PREFIX}{j}" for j in order[1:]]
        names = [call.fields[j].name for j in order]
        with_chars = inputs.withColumn(CHARS_COL, self._prompt_chars(call))
        layout = self._place_groups(with_chars, [lead], rest, n, splittable=True, names=names)
        return Layout(layout.df.drop(CHARS_COL), layout.notes, lead, layout.rows)

    def _place_groups(self, inputs: DataFrame, keys: list[str], rest: list[str], n: int, *,
                      splittable: bool, names: list[str]) -> Layout:
        """Group on ``keys``, balance the groups over ``n`` partitions, route the rows."""
        from pyspark.sql import functions as F

        chars = F.col(CHARS_COL) if CHARS_COL in inputs.columns else \
            F.length(F.concat_ws("\n", *[F.col(c).cast("string") for c in inputs.columns]))
        stats = (inputs.groupBy(*keys).agg(F.count(F.lit(1)).alias("__r"),
                                           F.sum(chars).alias("__c"))
                 .limit(self.settings.max_groups + 1).collect())
        lead_name = ", ".join(names[: len(keys)])
        if len(stats) > self.settings.max_groups:
            return Layout(inputs.repartitionByRange(n, *keys, *rest), (
                (f"spark partitioning: more than {self.settings.max_groups:,} prefix groups on "
                f"{lead_name}; range partitioning keeps equal values together"),))
        groups = [Group(tuple(r[k] for k in keys), int(r["__c"] or 0) // CHARS_PER_TOKEN + 1,
                        int(r["__r"]), splittable and bool(rest)) for r in stats]
        plan = plan_partitions(groups, n, slack=self.settings.slack)
        split_cols = self._split_columns(inputs, keys, rest, plan.splits)
        by = {s.key: names[len(keys) + rest.index(split_cols[s.key])] for s in plan.splits}
        notes = describe(plan, lead_name, groups=len(groups), split_by=by)
        return Layout(self._route(inputs, keys, plan, split_cols, n), notes,
                      rows=sum(g.rows for g in groups))

    def _split_columns(self, inputs: DataFrame, keys: list[str], rest: list[str],
                       splits: Sequence[Any]) -> dict[tuple[Any, ...], str]:
        """For each split group, its first later field with more than one value."""
        from pyspark.sql import functions as F

        if not splits:
            return {}
        cond = functools.reduce(lambda a, b: a | b, [
            functools.reduce(lambda a, b: a & b, [F.col(k).eqNullSafe(F.lit(v))
                                                  for k, v in zip(keys, s.key, strict=True)])
            for s in splits])
        counts = (inputs.where(cond).groupBy(*keys)
                  .agg(*[F.count_distinct(F.struct(F.col(c))).alias(c) for c in rest]).collect())
        out: dict[tuple[Any, ...], str] = {}
        for r in counts:
            key = tuple(r[k] for k in keys)
            out[key] = next((c for c in rest if r[c] > 1), rest[-1])
        for s in splits:
            out.setdefault(s.key, rest[-1])
        return out

    def _partition_keys(self, n: int) -> list[int]:
        """For each partition p, a bigint whose ``pmod(hash(k), n)`` is p (Spark's own hash)."""
        from pyspark.sql import functions as F

        if n not in self._pks:
            size = 32 * n
            while True:
                rows = (self.spark.range(0, size).select(
                    F.col("id"), F.pmod(F.hash(F.col("id")), F.lit(n)).alias("p"))
                    .groupBy("p").agg(F.min("id").alias("id")).collect())
                found = {int(r["p"]): int(r["id"]) for r in rows}
                if len(found) == n:
                    self._pks[n] = [found[p] for p in range(n)]
                    break
                size *= 4
        return self._pks[n]

    def _route(self, inputs: DataFrame, keys: list[str], plan: PartitionPlan,
               split_cols: dict[tuple[Any, ...], str], n: int) -> DataFrame:
        """Add each row's partition key per ``plan`` and repartition on it."""
        from pyspark.sql import functions as F
        from pyspark.sql import types as T

        pks = self._partition_keys(n)
        schema = T.StructType([T.StructField(f"{KEY_COL}{i}", inputs.schema[k].dataType)
                               for i, k in enumerate(keys)]
                              + [T.StructField(PK_COL, T.LongType())])
        rows = [(*key, pks[p]) for key, p in plan.assignment]
        table = F.broadcast(self.spark.createDataFrame(rows, schema))
        cond = functools.reduce(lambda a, b: a & b, [
            F.col(k).eqNullSafe(F.col(f"{KEY_COL}{i}")) for i, k in enumerate(keys)])
        joined = inputs.join(table, cond, "left")
        pk = F.col(PK_COL)
        for s in plan.splits:
            match = functools.reduce(lambda a, b: a & b, [
                F.col(k).eqNullSafe(F.lit(v).cast(inputs.schema[k].dataType))
                for k, v in zip(keys, s.key, strict=True)])
            chunk = F.pmod(F.hash(F.col(split_cols[s.key])), F.lit(len(s.partitions))) + 1
            targets = F.array(*[F.lit(pks[p]).cast("bigint") for p in s.partitions])
            pk = F.when(match, F.element_at(targets, chunk.cast("int"))).otherwise(pk)
        routed = joined.withColumn(PK_COL, pk).drop(*[f"{KEY_COL}{i}" for i in range(len(keys))])
        return routed.repartition(n, PK_COL).drop(PK_COL)
