"""A session's adapters: its catalog, its training runs, and ``adapter =>`` resolution.

:class:`AdapterRuns` is what :class:`~llmsql.session.Session` delegates the adapter
statements to. ``CREATE ADAPTER`` checks the backend can train, runs the ``AS SELECT``,
builds the examples (:mod:`llmsql.step.training`), writes the record (status
``training``) and starts the backend's training (:class:`~llmsql.backends.base.AdapterTrainer`);
a synchronous CREATE waits with a progress bar, an ``ASYNC`` one returns at once while a
watcher thread records progress and the end. Ctrl-C (or the session closing) cancels the
run, which keeps its newest checkpoint; the record is marked ``incomplete`` and the same
CREATE resumes it. A query's ``adapter => 'name'`` becomes an
:class:`~llmsql.backends.base.AdapterRef` only for a ``ready`` adapter of the query's base
model on a backend that serves adapters.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from llmsql.adapters.catalog import SHOW_COLUMNS, AdapterCatalog, AdapterRecord, check_base_model
from llmsql.backends.base import AdapterRef, AdapterTrainer, TrainJob
from llmsql.errors import ConfigError, LLMSQLError, PlanError
from llmsql.step.training import accuracy, build_examples, training_call

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from llmsql.adapters.statements import CreateAdapter
    from llmsql.backends.base import LLMBackend, TrainHandle, TrainProgress, TrainResult
    from llmsql.optimizer import RuleContext
    from llmsql.plan import LLMCall
    from llmsql.progress import Progress
    from llmsql.step.training import Examples

RECORD_EVERY_S = 2.0
"""A running training's record (progress, loss curve) is rewritten at most this often."""
CANCEL_WAIT_S = 120.0
"""How long a cancelled run is waited for (it writes a checkpoint first)."""


@dataclass(slots=True)
class _Run:
    """One training run of this session."""

    name: str
    handle: TrainHandle = None  # type: ignore[assignment]  # set once training started
    curve: list[tuple[int, float]] = field(default_factory=list)
    written: float = 0.0
    thread: threading.Thread | None = None


def weights_digest(path: str | Path, /) -> str:
    """A SHA-256 digest of the files of an adapter's weights folder (names and contents)."""
    h = hashlib.sha256()
    folder = Path(path)
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def show_table(records: Iterable[AdapterRecord], /) -> pa.Table:
    """``SHOW ADAPTERS``'s table: one row per record, the columns of ``SHOW_COLUMNS``."""
    rows = [r.show_row() for r in records]
    types = {"rank": pa.int64(), "steps": pa.int64(), "loss": pa.float64()}
    return pa.table({c: pa.array([r[c] for r in rows], types.get(c, pa.string()))
                     for c in SHOW_COLUMNS})


def trainer_of(backend: LLMBackend, /) -> AdapterTrainer:
    """``backend`` as an adapter trainer.

    Raises:
        ConfigError: it cannot train adapters (e.g. a dry run or an ``openai`` server).
    """
    if backend.capabilities.trains_adapters and isinstance(backend, AdapterTrainer):
        return backend
    msg = (f"CREATE ADAPTER needs a backend that trains LoRA adapters; backend "
           f"{backend.name!r} cannot (a dry run or a remote server never trains); open the "
           "session with backend='transformers' (or connect() without dry_run)")
    raise ConfigError(msg)


class AdapterRuns:
    """The adapters of one catalog folder as one session uses them.

    Args:
        folder: the catalog folder (created on the first CREATE).
    """

    def __init__(self, folder: str | Path) -> None:
        self.catalog = AdapterCatalog(folder)
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        self._recovered = False

    # -- statements -----------------------------------------------------------------------

    def records(self) -> tuple[AdapterRecord, ...]:
        """Every adapter (runs of an earlier process that stopped are marked incomplete)."""
        self._recover()
        return self.catalog.list()

    def drop(self, name: str, *, if_exists: bool = False) -> bool:
        """Drop ``name`` (cancelling its training in this session first)."""
        run = self._runs.get(name)
        if run is not None:
            run.handle.cancel()
            _wait(run.handle)
            if run.thread is not None:
                run.thread.join(CANCEL_WAIT_S)
        with self._lock:
            return self.catalog.drop(name, if_exists=if_exists)

    def create(self, stmt: CreateAdapter, *, backend: LLMBackend, identity: str,
               rows: Callable[[], pa.Table], rule_ctx: RuleContext,
               slo_tpot_ms: float | None, progress: Progress) -> pa.Table:
        """Run ``CREATE ADAPTER``; return its one-row result (``SHOW ADAPTERS``' columns).

        Raises:
            ConfigError: the backend cannot train.
            PlanError: the name is taken (nothing changed), or the rows or labels are bad.
            KeyboardInterrupt: Ctrl-C while training (the adapter is left incomplete).
        """
        trainer = trainer_of(backend)
        self._recover()
        fresh = self.catalog.new_record(stmt, base_model=identity)
        self._check_free(fresh)
        call = training_call(stmt)
        examples = build_examples(stmt, call, rows(), backend, rule_ctx)
        before = accuracy(call, examples.holdout, examples.holdout_expected,
                          backend.generate, None)
        with self._lock:
            record = self.catalog.create(fresh)
        job = TrainJob(stmt.name, examples.train, examples.holdout, stmt.lora, record.path,
                       str(self.catalog.checkpoint_path(stmt.name)), slo_tpot_ms)
        run = _Run(stmt.name)
        run.handle = trainer.start_training(job, lambda p: self._on_progress(p, run))
        self._runs[stmt.name] = run
        if stmt.asynchronous:
            run.thread = threading.Thread(
                target=self._finish_quietly, args=(run, call, examples, backend, before),
                name=f"llmsql-adapter-{stmt.name}", daemon=True)
            run.thread.start()
            return show_table([self.catalog.get(stmt.name)])
        try:
            _wait_with_bar(run.handle, progress, f"CREATE ADAPTER {stmt.name}")
        except KeyboardInterrupt:
            self._interrupt(run, "interrupted (Ctrl-C)")
            raise
        finally:
            progress.close()
        return show_table([self._finish(run, call, examples, backend, before)])

    def resolve(self, calls: Iterable[LLMCall], *, identity: Callable[[str | None], str],
                serves: Callable[[str | None], bool] | None) -> dict[str, AdapterRef]:
        """The adapters ``calls`` name, as references to their weights.

        Args:
            identity: the base model identity a call's model option gives.
            serves: whether the backend of a call's model runs adapters (None: not checked,
                e.g. a dry run that sends nothing).

        Raises:
            PlanError: an unknown adapter, one not ready (its status says what to do), one
                of another base model, or its weights are gone.
            ConfigError: the backend cannot run adapters.
        """
        out: dict[str, AdapterRef] = {}
        for call in calls:
            name = call.options.adapter
            if name is None or name in out:
                continue
            ref = resolve_ref(self.catalog, call, identity=identity(call.options.model))
            if serves is not None and not serves(call.options.model):
                msg = (f"{call.where} runs with adapter {name!r}, but this session's backend "
                       "cannot run LoRA adapters; use backend='transformers' or 'vllm', or "
                       "remove adapter =>")
                raise ConfigError(msg)
            out[name] = ref
        return out

    def close(self) -> None:
        """Cancel this session's running trainings; each is left incomplete (resumable)."""
        for run in list(self._runs.values()):
            if not run.handle.done():
                self._interrupt(run, "the session closed during training")
            if run.thread is not None:
                run.thread.join(CANCEL_WAIT_S)

    # -- runs -----------------------------------------------------------------------------

    def _recover(self) -> None:
        if not self._recovered:
            with self._lock:
                self.catalog.recover()
            self._recovered = True

    def _check_free(self, fresh: AdapterRecord) -> None:
        """Refuse a taken name before any work (the same check ``catalog.create`` makes)."""
        if fresh.name not in self.catalog.names():
            return
        existing = self.catalog.get(fresh.name)
        if existing.status == "training" and fresh.name in self._runs:
            msg = (f"adapter {fresh.name!r} is training in this session now; wait for it "
                   "(SHOW ADAPTERS shows its progress) or DROP ADAPTER it")
            raise PlanError(msg)
        if not (existing.status == "incomplete" and existing.same_definition(fresh)):
            raise self.catalog._exists(existing, fresh)  # noqa: SLF001  # one message

    def _on_progress(self, p: TrainProgress, run: _Run) -> None:
        if p.loss is not None and (not run.curve or run.curve[-1][0] < p.step):
            run.curve.append((p.step, float(p.loss)))
        now = time.monotonic()
        if now - run.written < RECORD_EVERY_S:
            return
        run.written = now
        with self._lock, contextlib.suppress(LLMSQLError):  # a lost update is no loss
            self.catalog.update(run.name, progress=f"{p.step}/{p.steps} steps",
                                loss_curve=run.curve)

    def _finish(self, run: _Run, call: LLMCall, examples: Examples, backend: LLMBackend,
                before: float | None) -> AdapterRecord:
        """Wait for the run's end; record it ready (with held-out metrics) or failed."""
        try:
            result = run.handle.result()
            after = accuracy(call, examples.holdout, examples.holdout_expected,
                             backend.generate, result.adapter)
        except KeyboardInterrupt:
            self._interrupt(run, "interrupted (Ctrl-C)")
            raise
        except Exception as exc:
            with self._lock:
                self.catalog.update(run.name, status="failed", reason=_reason(exc))
            raise
        finally:
            self._runs.pop(run.name, None)
        metrics = _metrics(result, examples, before, after)
        with self._lock:
            return self.catalog.update(
                run.name, status="ready", reason="", loss_curve=result.loss_curve or run.curve,
                metrics=metrics, path=result.adapter.path,
                digest=result.adapter.digest or weights_digest(result.adapter.path),
                progress=f"{result.steps}/{result.steps} steps")

    def _finish_quietly(self, run: _Run, call: LLMCall, examples: Examples,
                        backend: LLMBackend, before: float | None) -> None:
        """An ASYNC run's watcher: its end is in the record (failed: with the reason)."""
        with contextlib.suppress(Exception):
            self._finish(run, call, examples, backend, before)

    def _interrupt(self, run: _Run, why: str) -> None:
        run.handle.cancel()
        _wait(run.handle)
        self._runs.pop(run.name, None)
        step = run.handle.progress()
        reason = (f"{why} at step {step.step} of {step.steps}; run the same CREATE ADAPTER "
                  "again to resume from the last checkpoint, or DROP ADAPTER it")
        with self._lock, contextlib.suppress(LLMSQLError):
            self.catalog.update(run.name, status="incomplete", reason=reason,
                                loss_curve=run.curve, progress=f"{step.step}/{step.steps} steps")


def _wait(handle: TrainHandle) -> None:
    with contextlib.suppress(BaseException):
        handle.result(timeout=CANCEL_WAIT_S)


def _wait_with_bar(handle: TrainHandle, progress: Progress, label: str) -> None:
    """Wait for ``handle`` to end, drawing its steps on ``progress``."""
    shown, tokens, started = 0, 0, False
    while True:
        finished = handle.done()
        p = handle.progress()
        if not started and p.steps:
            progress.start(p.steps, label, unit="steps")
            started = True
        if started and p.step > shown:
            progress.advance(p.step - shown, p.tokens - tokens, None)
            shown, tokens = p.step, p.tokens
        if finished:
            return
        time.sleep(0.1)


def _metrics(result: TrainResult, examples: Examples, before: float | None,
             after: float | None) -> dict[str, float]:
    out = {"train_rows": float(len(examples.train)),
           "holdout_rows": float(len(examples.holdout)),
           "train_tokens": float(result.tokens), "train_seconds": round(result.seconds, 3),
           "steps": float(result.steps), "resumed_from": float(result.resumed_from)}
    if result.holdout_loss is not None:
        out["holdout_loss"] = float(result.holdout_loss)
    if before is not None and after is not None:
        out["accuracy_before"], out["accuracy_after"] = before, after
    return out


def _reason(exc: BaseException) -> str:
    return f"training failed: {type(exc).__name__}: {exc}"[:500]


def resolve_ref(catalog: AdapterCatalog, call: LLMCall, /, *, identity: str) -> AdapterRef:
    """The reference to the weights of the adapter ``call`` names (its ``adapter =>``),
    checked: it exists, is ready, and was trained for the base model ``identity``.

    Raises:
        PlanError: an unknown adapter, one not ready (its status says what to do), one of
            another base model, or its weights are gone.
    """
    name = call.options.adapter
    if name is None:
        msg = f"{call.where} names no adapter; resolve_ref needs a call with adapter =>"
        raise PlanError(msg)
    record = catalog.get(name)
    _check_ready(record, call)
    check_base_model(record, identity)
    return AdapterRef(name, record.path, record.digest or _digest(record))


def _check_ready(record: AdapterRecord, call: LLMCall) -> None:
    if record.status == "ready":
        return
    what = {
        "training": (f"is still training ({record.progress or 'starting'}); wait for it to "
                     "finish (SHOW ADAPTERS shows its progress) or run the query without "
                     "adapter =>"),
        "failed": (f"failed ({record.reason}); DROP ADAPTER {record.name} and CREATE it "
                   "again"),
        "incomplete": (f"is incomplete ({record.reason}); run its CREATE ADAPTER again to "
                       "resume training"),
    }[record.status]
    msg = f"{call.where} uses adapter {record.name!r}, which {what}"
    raise PlanError(msg)


def _digest(record: AdapterRecord) -> str:
    if not Path(record.path).is_dir():
        msg = (f"adapter {record.name!r}'s weights folder {record.path} is missing; DROP "
               f"ADAPTER {record.name} and CREATE it again")
        raise PlanError(msg)
    return weights_digest(record.path)


def metrics_of(record: AdapterRecord, /) -> dict[str, Any]:
    """A record's held-out metrics as a dict (for printing)."""
    return json.loads(record.show_row()["metrics"])  # type: ignore[arg-type]
