"""What runs on Spark executors: one inference worker per executor, and the LLM step per task.

**One worker per executor (per GPU).** A task asks :func:`worker_backend` for the backend of a
:class:`~llmsql.backends.base.BackendSpec` (the spec travels in the task; engines never do).
The worker process is keyed by the executor's JVM (its pid and start time) and, when Spark
gave the task GPUs, by their addresses: its socket is
``<private dir>/spark-<jvm pid>-<gpu>-<spec digest>.sock``. Every task of that executor, in
any Python worker process, attaches to the same worker, so concurrent tasks are batched into
one engine and share one prefix KV cache, and the model is loaded once per executor.

**Lifetime.** Spark kills idle Python worker processes, so no task process may own the
worker. The first task instead starts a small *keeper* process (``python -m
llmsql.executors.spark.worker``) in its own session; the keeper starts the worker through
:func:`llmsql.backends.worker.connect_or_start` and owns it, and stops it when the executor's
JVM exits or when no task has been connected for ``idle_timeout`` seconds (the spec option,
default 600). A file lock makes concurrent first tasks start one keeper.

**The step.** :func:`answer_partition` is the ``mapInArrow`` function of an LLM call: it
answers its whole partition with :func:`llmsql.step.run_call` (the same code the
DuckDB engine runs, so the optimizer orders the partition's rows) and yields the lookup rows
plus one statistics row. The task opens the session's result cache by its path (answers are
read before the worker is even attached to, and written batch by batch), starts from the
answers the query already has for the call's prompts, and keeps to its partition's share of
the query's budgets; what it spent, and any failure a retry would only repeat, go back in the
statistics row. :func:`answer_column` and :func:`answer_group` do the same for the
DataFrame API's Arrow UDFs, one Arrow batch or group at a time.

The per-process client cache (:data:`_CLIENTS`) is the one module-level state of llmsql: a
Spark task has no session to hang it on, and STYLE 7.5 asks for one engine per executor.

This module is over the 500-line guideline: everything here runs inside Spark's Python
workers and is shipped to them by reference, so the keeper process, the client cache and the
three entry points (partitions, columns, groups) stay in one importable module.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import pickle
import socket
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import pyarrow as pa
import pyarrow.compute as pc

from llmsql.backends.worker import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_STARTUP_TIMEOUT,
    WorkerClient,
    connect_or_start,
    file_lock,
    private_dir,
    spec_digest,
)
from llmsql.backends.worker.protocol import checkout_env, log_tail, spawn_with_spec
from llmsql.budget import BUDGET_NAMES, Budget, BudgetMeter, Price
from llmsql.cache import LazyBackend, ResultCache
from llmsql.errors import (
    BackendError,
    BudgetExceeded,
    CallFailed,
    ConfigError,
    ContextLengthError,
    LLMSQLError,
)
from llmsql.executors.spark.adapters import ShippedAdapter, adapter_root, local_refs
from llmsql.plan import ARG_PREFIX, GROUP_PREFIX, RESULT_COL, LLMCall
from llmsql.progress import NoProgress
from llmsql.step import KnownAnswers, StepEnv, distinct_rows, remember, result_type, run_call
from llmsql.step.offload import offload_delta

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Iterator, Sequence

    from llmsql.backends.base import AdapterRef, BackendSpec, LLMBackend
    from llmsql.moe.plan import OffloadStats
    from llmsql.optimizer import RuleContext
    from llmsql.stats import CallStats

logger = logging.getLogger(__name__)

STATS_COL = "__llmsql_stats"
"""Output column of :func:`answer_partition` that is set only on its statistics row."""
COUNT_COL = "__llmsql_n"
"""Input column: how many input rows a distinct input stands for."""
LEAD_VALUES_REPORTED = 1000
"""At most this many distinct leading values are reported per partition."""

_CLIENTS: dict[str, WorkerClient] = {}
_CLIENTS_LOCK = threading.Lock()


# ---- executor identity ------------------------------------------------------------------


def _proc_stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def executor_jvm() -> tuple[int, int]:
    """The executor JVM hosting this Python worker: ``(pid, start time in clock ticks)``.

    Python workers are children (or grandchildren, through pyspark's daemon) of the JVM; the
    start time guards against pid reuse. Without ``/proc`` the parent pid is used.
    """
    pid = os.getpid()
    for _ in range(6):
        stat = _proc_stat(pid)
        if stat is None:
            return os.getppid(), 0
        if _comm(pid) == "java":
            return pid, int(stat[19])
        pid = int(stat[1])
        if pid <= 1:
            break
    return os.getppid(), 0


def _alive(pid: int, start: int) -> bool:
    stat = _proc_stat(pid)
    if stat is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat[0] != "Z" and (start == 0 or int(stat[19]) == start)


def _task_gpus() -> str:
    """The GPU addresses Spark gave this task (``spark.task.resource.gpu.amount``), or ''."""
    try:
        from pyspark import TaskContext
    except ImportError:  # not inside Spark
        return ""
    ctx = TaskContext.get()
    gpu = ctx.resources().get("gpu") if ctx is not None else None
    return ",".join(gpu.addresses) if gpu is not None else ""


def socket_path(spec: BackendSpec, jvm: int, gpus: str) -> str:
    """The worker socket of ``spec`` for one executor JVM (and GPU set)."""
    tag = gpus.replace(",", "_") or "x"
    return str(private_dir() / f"spark-{jvm}-{tag}-{spec_digest(spec)}.sock")


# ---- the keeper ---------------------------------------------------------------------------


def _socket_alive(path: str) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        return False
    finally:
        sock.close()
    return True


def _flock(path: str, timeout: float) -> contextlib.AbstractContextManager[None]:
    def fail() -> BackendError:
        return BackendError(f"timed out waiting for the keeper lock {path}", backend="spark")

    return file_lock(path, timeout, fail)


def _spawn_keeper(spec: BackendSpec, path: str, jvm: tuple[int, int], gpus: str,
                  idle_timeout: float) -> subprocess.Popen[bytes]:
    env = checkout_env()
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    cmd = [sys.executable, "-m", "llmsql.executors.spark.worker", "--socket", path,
           "--watch-pid", str(jvm[0]), "--watch-start", str(jvm[1]),
           "--idle-timeout", str(idle_timeout)]
    proc = spawn_with_spec(cmd, spec, path + ".keeper.log", env)
    threading.Thread(target=proc.wait, daemon=True).start()  # reap it if it exits early
    return proc


def _ensure_worker(spec: BackendSpec, path: str, jvm: tuple[int, int], gpus: str) -> None:
    """Make sure a keeper-owned worker serves ``path`` (start one if none does)."""
    if _socket_alive(path):
        return
    startup = float(spec.option("startup_timeout") or DEFAULT_STARTUP_TIMEOUT)
    idle = spec.option("idle_timeout")
    idle = float(DEFAULT_IDLE_TIMEOUT if idle is None else idle)
    with _flock(path + ".keeper.lock", startup):
        if _socket_alive(path):
            return
        proc = _spawn_keeper(spec, path, jvm, gpus, idle)
        deadline = time.monotonic() + startup
        while not _socket_alive(path):
            if proc.poll() is not None or time.monotonic() > deadline:
                msg = (
                    f"the llmsql worker keeper for {spec.kind} did not start a worker at {path} "
                    f"(exit code {proc.poll()}); its log ends with:\n"
                    f"{log_tail(path + '.keeper.log')}"
                )
                raise BackendError(
                    msg, backend=spec.kind)
            time.sleep(0.05)


def worker_backend(spec: BackendSpec, /) -> WorkerClient:
    """The client of this executor's worker for ``spec``, started on first use."""
    jvm = executor_jvm()
    gpus = _task_gpus()
    path = socket_path(spec, jvm[0], gpus)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(path)
        if client is None:
            _ensure_worker(spec, path, jvm, gpus)
            client = connect_or_start(spec, socket_path=path)
            _CLIENTS[path] = client
        return client


def _forget(client: WorkerClient) -> None:
    with _CLIENTS_LOCK:
        for key, value in list(_CLIENTS.items()):
            if value is client:
                del _CLIENTS[key]
    with contextlib.suppress(LLMSQLError):
        client.close()


def _parse_keeper_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m llmsql.executors.spark.worker",
                                 description="llmsql keeper: owns one executor's worker")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--watch-pid", type=int, required=True, help="the executor JVM")
    ap.add_argument("--watch-start", type=int, default=0, help="its start time (ticks)")
    ap.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT)
    return ap.parse_args(argv)


def keeper_main(argv: Sequence[str] | None = None) -> int:
    """Keeper entry point: start the worker, own it, stop it with the executor or when idle."""
    args = _parse_keeper_args(argv)
    os.umask(0o077)
    # The keeper is its own program whose stderr is its log file.
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    spec: BackendSpec = pickle.load(sys.stdin.buffer)
    try:
        client = connect_or_start(spec, socket_path=args.socket, idle_timeout=0)
    except LLMSQLError:
        logger.exception("starting the worker failed")
        return 1
    logger.info("worker %d ready at %s (owner: %s)", client.worker_pid, args.socket,
                client.owner)
    try:
        executor_gone = _serve(client, args)
    finally:
        client.close()
    if executor_gone:  # no task of this JVM can come any more: leave no files behind
        base = args.socket.removesuffix(".sock")
        for leftover in (f"{args.socket}.keeper.lock", f"{args.socket}.keeper.log",
                         f"{base}.lock", f"{base}.log"):
            with contextlib.suppress(OSError):
                os.unlink(leftover)
    return 0


def _serve(client: WorkerClient, args: argparse.Namespace) -> bool:
    """Wait until the executor exits (True) or no task used the worker for a while."""
    idle_since: float | None = None
    while _alive(args.watch_pid, args.watch_start):
        time.sleep(1.0)
        try:
            busy = client.stats().connections > 1  # the keeper's own connection is 1
        except LLMSQLError:
            logger.info("the worker is gone")
            return False
        now = time.monotonic()
        idle_since = None if busy else (idle_since or now)
        if idle_since is not None and 0 < args.idle_timeout < now - idle_since:
            logger.info("no task connected for %.0f s; stopping", args.idle_timeout)
            return False
    logger.info("executor JVM %d exited; stopping", args.watch_pid)
    return True


# ---- the LLM step in a task ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepTask:
    """Everything a ``mapInArrow`` task needs; picklable (no engine, no session, no file)."""

    call: LLMCall
    spec: BackendSpec
    rule_ctx: RuleContext
    """The session's rule settings; capabilities are the executor backend's."""
    out_schema: pa.Schema
    """The lookup columns as Spark expects them, then :data:`STATS_COL`."""
    time_zone: str
    lead: str | None = None
    """Input column whose distinct values are reported per partition (affinity checks)."""
    on_error: str = "null"
    """The session's ``on_error``: ``null`` or ``fail``."""
    cache_path: str | None = None
    """The session's result cache file, opened by each task (None: no cache)."""
    known: KnownAnswers = ()
    """Answers to this call's prompts already obtained in the query (e.g. by the
    selectivity sample): those inputs are not sent again."""
    budgets: tuple[Budget, ...] | None = None
    """Per partition id, its share of what is left of the query's budgets (None: none);
    a partition past the end was estimated empty and gets a zero share."""
    price: Price | None = None
    """The call's model price (``max_cost_usd``)."""
    adapters: tuple[ShippedAdapter, ...] = ()
    """The LoRA adapter the call runs with (``adapter =>``), its files included: executors
    may not see the driver's folder (see :mod:`.adapters`)."""


REPORTED_ERRORS: tuple[type[LLMSQLError], ...] = (BudgetExceeded, CallFailed, ContextLengthError)
"""Failures a retry would only repeat (and pay for again): a task reports them in its
statistics row instead of raising, and the driver raises them."""


def local_timestamps(table: pa.Table, time_zone: str) -> pa.Table:
    """Time-zoned timestamp columns as naive wall-clock times in ``time_zone``.

    Spark hands TIMESTAMP values over as UTC instants; DuckDB's TIMESTAMP is naive. The
    rendering contract prints the wall-clock time, so both engines render the same text.
    """
    for i, f in enumerate(table.schema):
        if pa.types.is_timestamp(f.type) and f.type.tz is not None:
            local = pc.local_timestamp(table.column(i).cast(pa.timestamp(f.type.unit, time_zone)))
            table = table.set_column(i, f.name, local)
    return table


@dataclass(slots=True)
class _TaskClient:
    """Attaches one task to this executor's worker (on first need) and measures the task's
    expert offload: the client outlives tasks, so its counters when the task attached are
    the task's baseline.
    """

    spec: BackendSpec
    client: WorkerClient | None = None
    before: OffloadStats | None = None

    def __call__(self) -> WorkerClient:
        self.client = worker_backend(self.spec)
        self.before = self.client.moe_stats()
        return self.client

    def moe(self) -> OffloadStats | None:
        """What offload measured for this task's batches (None: no offload, or never attached)."""
        return offload_delta(self.client, self.before) if self.client is not None else None


@dataclass(slots=True)
class _Attempt:
    """One answered partition: the lookup, its statistics and the backend that answered."""

    lookup: pa.Table
    stats: CallStats
    backend: LazyBackend
    moe: OffloadStats | None = None
    """What expert offload measured for this partition's batches (None: no offload)."""


def _env(spec: BackendSpec, rule_ctx: RuleContext, on_error: str, cache: ResultCache | None,
         budget: BudgetMeter | None, attach: _TaskClient | None = None,
         adapters: dict[str, AdapterRef] | None = None) -> tuple[StepEnv, LazyBackend]:
    """The step's environment on an executor.

    The worker is attached to lazily (by ``attach``): a partition answered entirely by the
    result cache (and whose model capabilities the cache recorded) never starts it. The
    model identity is the spec's :func:`~llmsql.cache.model_key`, as on the driver, so both
    share cache entries.
    """
    backend = LazyBackend(spec, attach or _TaskClient(spec), cache)
    env = StepEnv(
        backend_for=lambda _model: cast("LLMBackend", backend),
        rule_ctx=lambda b: dataclasses.replace(rule_ctx, capabilities=b.capabilities),
        progress=NoProgress(),
        on_error=on_error,
        cache=cache,
        budget=budget,
        adapters=adapters or {},
    )
    return env, backend


def task_adapters(adapters: Sequence[ShippedAdapter], /) -> dict[str, AdapterRef]:
    """The step's adapters by name, each pointing at this host's copy of its files (written
    on first need).

    Raises:
        BackendError: the copies cannot be written.
    """
    try:
        return local_refs(adapters)
    except OSError as exc:
        msg = (f"cannot write LoRA adapter files under {adapter_root()} on executor host "
               f"{socket.gethostname()} ({exc}); free disk space there")
        raise BackendError(msg, backend="spark") from exc


def _run(call: LLMCall, inputs: pa.Table, spec: BackendSpec, rule_ctx: RuleContext,
         on_error: str = "null", *, cache: ResultCache | None = None, known: KnownAnswers = (),
         budget: BudgetMeter | None = None,
         adapters: Sequence[ShippedAdapter] = ()) -> _Attempt:
    """``run_call`` on this executor's worker (with this host's copies of ``adapters``); one
    retry when the worker was lost.
    """
    refs = task_adapters(adapters)
    for attempt in (1, 2):
        attach = _TaskClient(spec)
        env, backend = _env(spec, rule_ctx, on_error, cache, budget, attach, refs)
        if known:
            remember(call, backend.model_id(), known, env.known)
        try:
            lookup, stats = run_call(call, inputs, env)
        except BackendError as exc:
            if attempt == 2 or "lost the llmsql worker" not in str(exc) or not backend.built:
                raise
            _forget(cast("WorkerClient", backend.backend()))
            continue
        moe = attach.moe()
        if moe is not None:  # the step's own line counts from the client's first call,
            # which may be an earlier task's (the client is kept per executor process)
            stats.moe = moe.describe()
        return _Attempt(lookup, stats, backend, moe)
    msg = "unreachable"
    raise AssertionError(msg)


def _open_cache(path: str | None) -> tuple[ResultCache | None, str | None]:
    """The result cache at ``path`` on this executor, or None and why it cannot be used.

    A cache this host cannot open (another user's file, a folder that does not exist here)
    only costs its savings; the task runs without it.
    """
    if path is None:
        return None, None
    cache = ResultCache(path)
    try:
        cache.open()
    except (ConfigError, sqlite3.Error) as exc:
        cache.close()
        return None, (f"result cache: {path} cannot be used on executor host "
                      f"{socket.gethostname()} ({str(exc).splitlines()[0]}); its tasks ran "
                      "without it")
    return cache, None


def _step_columns(call: LLMCall, names: Sequence[str]) -> list[str]:
    prefix = (ARG_PREFIX, GROUP_PREFIX) if call.kind.spec.aggregate else (ARG_PREFIX,)
    return [n for n in names if n.startswith(prefix)]


def restore_keys(call: LLMCall, original: pa.Table, rendered: pa.Table,
                 lookup: pa.Table) -> pa.Table:
    """The lookup with its key columns in Spark's types (they were localized to render)."""
    if call.kind.spec.aggregate or original.schema.equals(rendered.schema):
        return lookup
    keys = [c for c in rendered.column_names if c.startswith(ARG_PREFIX)]
    keep = distinct_rows(rendered, keys)
    table = original.select(keys).take(pa.array(keep, type=pa.int64()))
    return table.append_column(RESULT_COL, lookup.column(RESULT_COL))


def _partition_id() -> int:
    from pyspark import TaskContext

    ctx = TaskContext.get()
    return ctx.partitionId() if ctx is not None else -1


def _meter(task: StepTask, part: int) -> BudgetMeter | None:
    """This partition's share of the query's budgets (a zero share for an unknown id)."""
    if task.budgets is None:
        return None
    if 0 <= part < len(task.budgets):
        share = task.budgets[part]
    else:
        active = task.budgets[0] if task.budgets else Budget(max_calls=0)
        share = dataclasses.replace(active, **{n: 0 for n in BUDGET_NAMES
                                               if getattr(active, n) is not None})
    return BudgetMeter(share, lambda _model: task.price, scope=f"partition {part}'s share")


def _failure(exc: LLMSQLError) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, BudgetExceeded):
        out.update(budget=exc.budget, limit=exc.limit, used=exc.used)
    return out


def _report(task: StepTask, part: int, rows: int, inputs: pa.Table,
            done: _Attempt | None) -> dict[str, Any]:
    """The statistics row's content (``done`` is None when the partition failed)."""
    lead: list[str] | None = None
    if done is not None and task.lead is not None and task.lead in inputs.column_names:
        from llmsql.step import render_column

        lead = sorted(set(render_column(inputs.column(task.lead))))[:LEAD_VALUES_REPORTED]
    worker = None
    if done is not None and done.backend.built:
        worker = dataclasses.asdict(cast("WorkerClient", done.backend.backend()).stats())
    return {
        "stats": dataclasses.asdict(done.stats) if done is not None else {},
        "partition": part,
        "rows": rows,
        "executor": f"{socket.gethostname()}:{executor_jvm()[0]}",
        "worker": worker,
        "moe": None if done is None or done.moe is None else dataclasses.asdict(done.moe),
        "lead": lead,
        "model_id": done.backend.model_id() if done is not None else None,
        "notes": [],
        "used": None,
        "error": None,
    }


def _answer(task: StepTask, part: int, rows: int, inputs: pa.Table,
            ) -> tuple[pa.Table | None, dict[str, Any]]:
    """Answer one partition: its lookup (None when it failed) and its report."""
    cache, cache_note = _open_cache(task.cache_path)
    meter = _meter(task, part)
    done: _Attempt | None = None
    failure: dict[str, Any] | None = None
    try:
        done = _run(task.call, inputs, task.spec, task.rule_ctx, task.on_error, cache=cache,
                    known=task.known, budget=meter, adapters=task.adapters)
    except REPORTED_ERRORS as exc:
        failure = _failure(exc)
    finally:
        if cache is not None:
            cache.close()
    report = _report(task, part, rows, inputs, done)
    report["error"] = failure
    report["used"] = dataclasses.asdict(meter.used) if meter is not None else None
    if cache_note is not None:
        report["notes"].append(cache_note)
    if cache is not None and cache.write_errors:
        report["notes"].append(f"result cache: {cache.write_errors} write(s) to {cache.path} "
                               f"failed on {socket.gethostname()}")
    return (done.lookup if done is not None else None), report


def answer_partition(task: StepTask, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """``mapInArrow`` body: answer one partition; yield its lookup rows, then a stats row.

    The whole partition is answered at once, so the optimizer orders all of its rows. A
    failure a retry would only repeat (:data:`REPORTED_ERRORS`: a budget share exceeded,
    ``on_error = 'fail'``, a prompt too long) is reported in the statistics row, with what
    the task spent, and raised by the driver: Spark does not retry it, so nothing is paid
    twice.
    """
    collected = list(batches)
    if not collected or not any(b.num_rows for b in collected):
        return
    table = pa.Table.from_batches(collected)
    rows = (int(pc.sum(table.column(COUNT_COL)).as_py()) if COUNT_COL in table.column_names
            else table.num_rows)
    original = table.select(_step_columns(task.call, table.column_names))
    inputs = local_timestamps(original, task.time_zone)
    lookup, report = _answer(task, _partition_id(), rows, inputs)
    if lookup is not None:
        lookup = restore_keys(task.call, original, inputs, lookup)
        names = [f.name for f in task.out_schema if f.name != STATS_COL]
        body = lookup.select(names).cast(pa.schema([task.out_schema.field(n) for n in names]))
        body = body.append_column(task.out_schema.field(STATS_COL),
                                  pa.nulls(body.num_rows, pa.string()))
        yield from body.to_batches()
    row = [pa.nulls(1, f.type) for f in task.out_schema if f.name != STATS_COL]
    row.append(pa.array([json.dumps(report, default=str)], pa.string()))
    yield pa.RecordBatch.from_arrays(row, schema=task.out_schema)


# ---- the DataFrame API's Arrow UDFs ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ColumnTask:
    """A DataFrame-API call: the planned call, the spec and the rule settings."""

    call: LLMCall
    spec: BackendSpec
    rule_ctx: RuleContext
    time_zone: str
    result: pa.DataType
    adapters: tuple[ShippedAdapter, ...] = ()
    """The LoRA adapter the call runs with, its files included (as :attr:`StepTask.adapters`)."""


def _row_keys(table: pa.Table) -> list[str]:
    columns = [c.to_pylist() for c in table.columns]
    return [repr(row) for row in zip(*columns, strict=True)]


def answer_column(task: ColumnTask, arrays: Sequence[pa.Array]) -> pa.Array:
    """Scalar Arrow UDF body: answer one batch (each distinct input once), in row order."""
    table = local_timestamps(
        pa.table({f"{ARG_PREFIX}{j}": a for j, a in enumerate(arrays)}), task.time_zone)
    keep = distinct_rows(table, table.column_names)
    uniq = table.take(pa.array(keep, type=pa.int64()))
    lookup = _run(task.call, uniq, task.spec, task.rule_ctx, adapters=task.adapters).lookup
    answers = dict(zip(_row_keys(lookup.drop_columns([RESULT_COL])),
                       lookup.column(RESULT_COL).to_pylist(), strict=True))
    values = [answers.get(k) for k in _row_keys(table)]
    return pa.array(values, type=task.result).cast(task.result)


def answer_group(task: ColumnTask, arrays: Sequence[pa.Array]) -> Any:
    """Grouped-aggregate Arrow UDF body: one LLM_AGG answer for one group's rows."""
    table = local_timestamps(
        pa.table({f"{ARG_PREFIX}{j}": a for j, a in enumerate(arrays)}), task.time_zone)
    lookup = _run(task.call, table, task.spec, task.rule_ctx, adapters=task.adapters).lookup
    values = lookup.column(RESULT_COL).to_pylist()
    return values[0] if values else None


def column_result_type(call: LLMCall) -> pa.DataType:
    """The Arrow type a DataFrame-API call returns."""
    return result_type(call)


if __name__ == "__main__":
    from llmsql.executors.spark import worker as _module  # noqa: PLW0406 - the keeper runs as __main__; import this module by name

    sys.exit(_module.keeper_main())
