"""Field orders of a multi-field LLM call, chosen on the Spark driver as DuckDB chooses them.

With several fields appended to the instruction, ``reorder_prompts`` gives each row a field
order (:mod:`llmsql.optimizer.reorder_prompts`), and a model may answer a reordered prompt
differently. DuckDB runs the rule over all of a call's distinct inputs; Spark runs the rules
inside each partition's task, over that partition's rows only, where the rule could choose
another order for a row. So the driver runs the same rules (``dedup_prompts`` then
``reorder_prompts``) over the call's distinct inputs, rendered exactly as a task renders
them, and ships each row's order to the tasks in the rule context
(:class:`~llmsql.optimizer.context.PinnedFieldOrders`, keyed by a digest of the row's
rendered values); a task's ``reorder_prompts`` keeps them and orders only its rows. Every
row then gets DuckDB's prompt on any number of partitions.

Beyond ``spark.llmsql.maxFieldOrderRows`` distinct inputs or ``maxFieldOrderChars``
characters (:class:`~llmsql.executors.spark.layout.SparkSettings`), nothing is collected:
each partition chooses over its own rows, and the call's notes say so.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmsql.executors.spark.layout import CONF_PREFIX, SparkSettings
from llmsql.executors.spark.worker import local_timestamps
from llmsql.optimizer import optimize
from llmsql.optimizer.context import PinnedFieldOrders, RuleContext
from llmsql.optimizer.dedup_prompts import dedup_prompts
from llmsql.optimizer.reorder_prompts import reorder_prompts
from llmsql.plan import ARG_PREFIX, LLMCall
from llmsql.step import bind

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import DataFrame

__all__ = ["FieldOrders", "field_orders", "needs_field_orders", "pin_field_orders"]


@dataclass(frozen=True, slots=True)
class FieldOrders:
    """What the driver decided for a call's field orders."""

    pinned: PinnedFieldOrders | None = None
    """Every distinct input's field order (None: the partitions choose, or nothing to pin)."""
    notes: tuple[str, ...] = ()
    """For the call's notes (EXPLAIN, statistics)."""


def needs_field_orders(call: LLMCall, ctx: RuleContext, /) -> bool:
    """Whether a partition could give a row of ``call`` another field order than the whole
    input would: reordering on, and at least two appended fields whose order is free.
    """
    template = call.template
    return (ctx.reorder and not call.kind.spec.aggregate and not template.order_is_fixed
            and len(template.appended) >= 2)


def field_orders(call: LLMCall, inputs: DataFrame, ctx: RuleContext, settings: SparkSettings,
                 time_zone: str) -> FieldOrders:
    """The field orders of ``call``'s distinct ``inputs`` (one row each), chosen on the driver
    when they fit the limits: one small Spark job to measure, one to collect.
    """
    if not needs_field_orders(call, ctx):
        return FieldOrders()
    from pyspark.sql import functions as F

    args = [f"{ARG_PREFIX}{j}" for j in range(len(call.fields))]
    chars = functools.reduce(lambda a, b: a + b, [
        F.length(F.coalesce(F.col(a).cast("string"), F.lit(""))) for a in args])
    size = inputs.agg(F.count(F.lit(1)).alias("n"), F.sum(chars).alias("c")).first()
    rows = int(size["n"]) if size is not None else 0
    total = int(size["c"] or 0) if size is not None else 0
    over = _over_limit(rows, total, settings)
    if over is not None:
        return FieldOrders(notes=(
            f"field order chosen per partition ({over}): rows may get another field order, "
            "and answer, than on DuckDB",))
    table = local_timestamps(inputs.select(args).toArrow(), time_zone)
    return pin_field_orders(call, table, ctx)


def _over_limit(rows: int, chars: int, settings: SparkSettings) -> str | None:
    """Why the inputs are not collected (None: they fit)."""
    if rows > settings.max_field_order_rows:
        return (f"{rows:,} distinct inputs > {CONF_PREFIX}maxFieldOrderRows = "
                f"{settings.max_field_order_rows:,}")
    if chars > settings.max_field_order_chars:
        return (f"{chars:,} characters of distinct inputs > {CONF_PREFIX}maxFieldOrderChars "
                f"= {settings.max_field_order_chars:,}")
    return None


def pin_field_orders(call: LLMCall, inputs: pa.Table, ctx: RuleContext, /) -> FieldOrders:
    """Run the rules DuckDB runs before sending (``dedup_prompts``, ``reorder_prompts``) over
    the whole of ``inputs`` (rendered as a task renders them); pin each distinct row's order.
    """
    ctx = dataclasses.replace(ctx, pinned=None)
    batch, _ = optimize(bind(call, inputs), ctx, rules=(dedup_prompts, reorder_prompts))
    if batch.row_field_order is None:  # fewer than two prompts: the written order everywhere
        return FieldOrders()
    reps = batch.send_order()
    rows = zip(*batch.values, strict=True)
    chosen = {i: batch.field_order_of(i) for i in reps}
    pinned = PinnedFieldOrders.of(
        call.id, ((values, order) for i, values in enumerate(rows)
                  if (order := chosen.get(i)) is not None))
    note = (f"field orders chosen over all {len(pinned):,} distinct inputs on the driver, as "
            f"on DuckDB ({len(pinned.field_orders)} distinct); every partition keeps them")
    return FieldOrders(pinned, (note,))
