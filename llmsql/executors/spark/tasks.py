"""What the Spark driver makes of an LLM call's tasks (see :mod:`~llmsql.executors.spark`).

Each ``mapInArrow`` task of a call returns one statistics row
(:func:`llmsql.executors.spark.worker.answer_partition`). Here they become the call's
:class:`~llmsql.stats.CallStats` (:func:`merge_stats`), per-task
:class:`PartitionReport` entries and, when a task reported a failure that a retry would only
repeat, the error the driver raises (:func:`task_failure`). Also here: the per-partition size
estimates that budget shares are computed from (:func:`partition_sizes`), and a small call's
answers keyed for later calls of the query (:func:`known_entries`).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llmsql.errors as errors
from llmsql.backends.moe_glue import stats_from_dict, stats_sum
from llmsql.budget import Budget, PartSize, amount
from llmsql.errors import BudgetExceeded, ExecutionError, LLMSQLError
from llmsql.executors.spark.layout import CHARS_PER_TOKEN
from llmsql.executors.spark.worker import local_timestamps
from llmsql.plan import ARG_PREFIX, GROUP_PREFIX, RESULT_COL, LLMCall, PromptBatch
from llmsql.stats import MAX_ERRORS_KEPT, CallError, CallStats
from llmsql.step import KnownAnswers, StepEnv, render_column

if TYPE_CHECKING:
    from collections.abc import Sequence

    import pyarrow as pa
    from pyspark.sql import DataFrame

    from llmsql.moe.plan import OffloadStats

KNOWN_COLLECT_ROWS = 1024
"""A call with at most this many distinct inputs (such as a selectivity sample) has its
answers collected to the driver, so later calls of the query with the same prompts do not
send them again; larger calls' answers stay on the executors."""


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
    moe: OffloadStats | None = None
    """What the worker's expert offload measured for this task's batches (None: none)."""


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
    out.errors = [CallError(**e) for p in parts
                  for e in p["stats"].get("errors", ())][:MAX_ERRORS_KEPT]
    if parts:
        biggest = max(parts, key=lambda p: p["rows"])
        suffix = f" [largest of {len(parts)} partitions]" if len(parts) > 1 else ""
        out.notes = tuple(f"{n}{suffix}" for n in biggest["stats"].get("notes", ()))
    task_notes = [n for p in parts for n in p.get("notes", ())]
    out.notes = (*out.notes, *dict.fromkeys(task_notes))
    measured = [stats_from_dict(p["moe"]) for p in parts if p.get("moe") is not None]
    out.moe = stats_sum(measured).describe() if measured else None
    return out


def partition_report(call: LLMCall, p: dict[str, Any]) -> PartitionReport:
    """One task's statistics row (as :func:`~llmsql.executors.spark.worker.answer_partition`
    returns it) as the driver's :class:`PartitionReport`.
    """
    w = p.get("worker") or {}  # None: the task never needed the worker (all cached)
    lead = p.get("lead")
    return PartitionReport(call.id, int(p["partition"]), str(p["executor"]),
                           int(w.get("pid", 0)), int(w.get("model_loads", 0)), int(p["rows"]),
                           int(p["stats"].get("prompt_tokens", 0)),
                           int(p["stats"].get("cached_tokens", 0)),
                           tuple(lead) if lead is not None else None, dict(w),
                           stats_from_dict(p["moe"]) if p.get("moe") is not None else None)


def _index_of(items: list[tuple[int, ...]], item: tuple[int, ...]) -> int:
    """The position of ``item`` in ``items``, appending it first when missing."""
    if item not in items:
        items.append(item)
    return items.index(item)


def merge_batches(items: Sequence[tuple[PromptBatch, tuple[int, ...]]],
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


# ---- budgets, known answers and task failures ------------------------------------------------


def partition_sizes(call: LLMCall, df: DataFrame) -> list[PartSize]:
    """Per partition id, up to the last non-empty one, its estimated prompts and prompt
    tokens (one Spark job). Prompt characters are counted as the template renders them.
    """
    from pyspark.sql import functions as F

    def width(j: int) -> Any:
        text = F.coalesce(F.col(f"{ARG_PREFIX}{j}").cast("string"), F.lit(""))
        return F.length(text) + len(call.fields[j].name) + 3

    lines = functools.reduce(lambda a, b: a + b, [width(j) for j in range(len(call.fields))],
                             F.lit(len(call.template.instruction) + 1))
    groups = [c for c in df.columns if c.startswith(GROUP_PREFIX)]
    if call.kind.spec.aggregate:
        prompts = F.count_distinct(F.struct(*groups)) if groups else F.lit(1)
    else:
        prompts = F.count(F.lit(1))
    rows = (df.select(F.spark_partition_id().alias("p"), lines.alias("c"), *groups)
            .groupBy("p").agg(prompts.alias("n"), F.sum("c").alias("c")).collect())
    found = {int(r["p"]): PartSize(int(r["n"]), int(r["c"] or 0) // CHARS_PER_TOKEN + 1)
             for r in rows}
    return [found.get(p, PartSize(0, 0)) for p in range(max(found, default=-1) + 1)]


def known_entries(call: LLMCall, lookup: pa.Table, time_zone: str) -> KnownAnswers:
    """A lookup's answers keyed as the LLM step keys them (rendered field values)."""
    keys = [f"{ARG_PREFIX}{j}" for j in range(len(call.fields))]
    rendered = local_timestamps(lookup.select(keys), time_zone)
    columns = [render_column(rendered.column(k)) for k in keys]
    answers = lookup.column(RESULT_COL).to_pylist()
    return tuple(zip(zip(*columns, strict=True), answers, strict=True))


def task_failure(call: LLMCall, env: StepEnv, failed: list[dict[str, Any]], n: int,
                  left: Budget | None) -> LLMSQLError:
    """The error a task reported (the first by partition) as the driver raises it."""
    first = min(failed, key=lambda p: p["partition"])
    error = first["error"]
    more = f" ({len(failed) - 1} more partition(s) failed too)" if len(failed) > 1 else ""
    if error["type"] == BudgetExceeded.__name__ and env.budget is not None and left is not None:
        name = error["budget"]
        limit = getattr(env.budget.budget, name)
        used = env.budget.used.value(name)
        kept = ("answers already received are kept in the result cache, so a re-run does not "
                "pay for them" if env.cache is not None else
                "the result cache is off: a re-run pays for them again")
        return BudgetExceeded(
            f"budget llmsql.{name} = {amount(limit)}: {call.where} ran on Spark, where the "
            f"{amount(getattr(left, name))} left of it were split over {n} partition(s) in "
            "proportion to their estimated size, and a partition needed more than its share "
            f"[{error['message']}]{more}. {amount(used)} used so far in this query; {kept}. "
            f"Raise the budget (SET llmsql.{name} = ...), leaving headroom for partitions "
            "that need more than their estimate, and run again",
            budget=name, limit=float(limit), used=float(used))
    cls = getattr(errors, str(error["type"]), ExecutionError)
    if isinstance(cls, type) and issubclass(cls, ExecutionError):
        return cls(f"{error['message']}{more}", executor="spark", step=call.id)
    return ExecutionError(f"{error['message']}{more}", executor="spark", step=call.id)


__all__ = ["KNOWN_COLLECT_ROWS", "PartitionReport", "known_entries", "merge_batches",
           "merge_stats", "partition_report", "partition_sizes", "task_failure"]
