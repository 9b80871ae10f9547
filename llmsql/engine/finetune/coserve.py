"""Co-serving: LoRA training in the gaps of an :class:`~llmsql.engine.runner.Engine`'s
inference, on the same model and device (after FlexLLM).

:class:`CoServer` attaches to an engine through its ``after_pass`` hook and runs submitted
:class:`~llmsql.engine.finetune.train.Trainer` s, one at a time, in two ways:

- **No inference running** (for ``idle_delay`` seconds): a background thread trains at full
  speed, in pieces of ``idle_tokens`` forward tokens or ``idle_layers`` backward layers (with
  an objective, at most what the fitted model says fits in it, but at least ``probe_tokens``
  tokens or one layer), so a query that arrives waits for one piece at most.
- **While the engine runs inference** (inside :meth:`CoServer.inference`, or
  :meth:`CoServer.run`): after each inference forward pass (prefix, prefill, decode or
  score), in the inference thread, one fine-tuning piece runs, sized by FlexLLM's rule:
  inference first, fine-tuning fills what is left. The forward piece's token count is
  :func:`~llmsql.engine.finetune.schedule.plan_iteration` (``token_budget`` minus the pass's
  tokens, at most ``max_finetune_tokens``), and with an objective (``slo_tpot_ms``) also at
  most what the fitted step-time model (:class:`~llmsql.engine.finetune.steptime
  .StepTimeModel`) says fits in the time left; a backward piece runs the layers that fit
  there (without an objective: ``backward_layers`` layers, FlexLLM's
  ``num_layers_per_finetuning_step``). The time left is ``headroom * slo - t_pass`` plus the
  *credit* of the run so far: what earlier passes of the same :meth:`inference` run left
  unused, minus what pieces spent, capped at ``burst * slo``. The objective is thus kept on
  the run's mean time per iteration (what a request's TPOT measures), not on every single
  iteration, and pieces are fewer and larger: a forward piece smaller than ``probe_tokens``
  waits for more credit instead (its fixed cost, Python and kernel launches per layer, would
  dominate). ``burst=0`` gives the strict per-iteration rule. ``t_pass`` is the pass's
  *measured* time (known exactly once it ran, so it beats a prediction); the fitted model
  predicts the fine-tuning piece, and is refitted from every measured pass and piece. With no
  measurement of a piece kind yet, a small probe piece (``probe_tokens`` tokens or one
  layer) runs and is measured.

**One model, one thread at a time.** An ``RLock`` guards the model: :meth:`inference` holds it
for the whole inference run (the hook runs inside, in the same thread), the background
thread takes it per piece and yields to waiting inference. Inference must run inside
:meth:`inference` (or :meth:`run`): a pass outside it is counted but gets no fine-tuning,
and would race with the background thread.

**Adapters.** ``activate`` (per co-server, or per :meth:`submit`) is called as
``activate(True)`` and returns a context manager entered around each fine-tuning piece: it
switches the model to the training adapter and restores the inference state on exit (e.g.
PEFT's ``set_adapter`` to the training adapter, then back / disabled). Default: no
switching (the trained parameters then take part in inference too, which is right only when
inference should see the adapter).

**What differs from FlexLLM.** FlexLLM fuses an iteration's inference tokens and
fine-tuning tokens into one batch of kernels (one pass over the weights). Here they run as
consecutive passes on the same device within one iteration: the inference pass, then the
fine-tuning piece, so each reads the weights separately, and the per-piece Python overhead
is paid apart. The token and layer rules, the one-active-training-sequence rule and the
layer-chunked backward are FlexLLM's; the SLO sizing with a fitted model is llmsql's.

**Counters** (:class:`CoServeStats`, same field names as the backends' ``CoServeStats``):
``slo_misses`` counts inference passes whose time plus the fine-tuning piece after them
exceeds the objective (every pass kind counts, prefill included; none without objective); with
``burst`` > 0 a single iteration may exceed it while the run's mean keeps it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from llmsql.engine.finetune.job import CoServeJob, CoServeStats
from llmsql.engine.finetune.schedule import plan_iteration
from llmsql.engine.finetune.steptime import BACKWARD, FORWARD, StepTimeModel
from llmsql.errors import ConfigError, ExecutionError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from llmsql.engine.finetune.train import Trainer
    from llmsql.engine.runner import Engine, Generated, Job, Scored
    from llmsql.engine.timing import StepTime

class CoServer:
    """Co-serves submitted training runs with ``engine``'s inference (module docstring).

    Args:
        engine: The engine whose model the trainers train (its ``after_pass`` hook must be
            free).
        slo_tpot_ms: The time-per-output-token objective of an iteration (None: none; the
            token budget alone sizes pieces).
        token_budget: Tokens per iteration (FlexLLM's ``max_tokens_per_batch``).
        max_finetune_tokens: Most fine-tuning forward tokens per iteration.
        activate: Switches the model to the training adapter (see the module docstring).
        backward_layers: Backward layers per iteration without an objective.
        headroom: The share of the objective pieces are sized to fill (the rest absorbs
            prediction error).
        probe_tokens: The forward piece size while no forward piece was measured yet.
        idle_tokens: Forward piece size while no inference runs (default: the trainer's
            ``chunk_tokens``).
        idle_layers: Backward layers per piece while no inference runs (default: a quarter
            of the layers, at least one).
        interleave: Run pieces after inference passes (False: train only while no inference
            runs, e.g. for a temporal-sharing baseline or when co-serving is switched off).
        idle_delay: Seconds without inference before the background thread trains.
        burst: Objective time unused by earlier passes of a run may be spent later, up to
            ``burst`` objectives (0: each pass's leftover only; see the module docstring).

    Raises:
        ConfigError: an option out of range, or ``engine`` already has an ``after_pass``.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        slo_tpot_ms: float | None = None,
        token_budget: int = 1024,
        max_finetune_tokens: int = 256,
        activate: Callable[[bool], contextlib.AbstractContextManager[Any]] | None = None,
        backward_layers: int = 1,
        headroom: float = 0.9,
        probe_tokens: int = 16,
        idle_tokens: int | None = None,
        idle_layers: int | None = None,
        interleave: bool = True,
        idle_delay: float = 0.002,
        burst: float = 4.0,
    ) -> None:
        """Attach to ``engine``; no thread starts before the first :meth:`submit`."""
        _check(token_budget, max_finetune_tokens, backward_layers, headroom, probe_tokens)
        if engine.after_pass is not None:
            msg = ("the engine already has an after_pass hook (another CoServer?); close "
                   "that co-server first")
            raise ConfigError(msg)
        self.engine = engine
        self.slo_s = _slo_seconds(slo_tpot_ms)
        self.token_budget, self.max_finetune_tokens = token_budget, max_finetune_tokens
        self.activate = activate
        self.backward_layers, self.headroom, self.probe_tokens = (backward_layers, headroom,
                                                                   probe_tokens)
        self.idle_tokens, self.idle_layers = idle_tokens, idle_layers
        self.interleave, self.idle_delay = interleave, idle_delay
        if burst < 0:
            msg = f"CoServer: burst = {burst}; pass >= 0 (0: each pass on its own)"
            raise ConfigError(msg)
        self.burst = burst
        self._credit = 0.0  # seconds of the objective earlier passes of this run left unused
        self.model = StepTimeModel()
        self._stats = CoServeStats()
        self._lock = threading.RLock()  # the model: one thread at a time
        self._cond = threading.Condition()  # state changes: submit, inference, cancel, close
        self._waiting = 0  # inference runs waiting for or holding the model
        self._owner: int | None = None  # the thread running inference
        self._jobs: list[CoServeJob] = []
        self._closed = False
        self._thread: threading.Thread | None = None
        engine.after_pass = self._after_pass

    # ------------------------------------------------------------------ public
    def submit(
        self,
        trainer: Trainer,
        *,
        activate: Callable[[bool], contextlib.AbstractContextManager[Any]] | None = None,
        on_progress: Callable[[Trainer], None] | None = None,
    ) -> CoServeJob:
        """Queue ``trainer`` (runs after those before it); returns its handle.

        ``activate`` overrides the co-server's for this run. ``on_progress(trainer)`` is
        called after each optimizer step, from whichever thread ran it (the background
        thread or an inference thread): keep it short.

        Raises:
            ExecutionError: the co-server is closed.
        """
        job = CoServeJob(trainer, activate if activate is not None else self.activate,
                         on_progress)
        with self._cond:
            if self._closed:
                msg = "the co-server is closed; create a new CoServer to train"
                raise ExecutionError(msg)
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._background, daemon=True,
                                                name="llmsql-coserve")
                self._thread.start()
            self._cond.notify_all()
        return job

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """Hold the model for inference (re-entrant): run ``engine.run`` (or any engine
        call) inside; fine-tuning pieces then run after its passes, in this thread.
        """
        with self._cond:
            self._waiting += 1
        self._lock.acquire()
        outer = self._owner
        if outer is None:
            self._credit = 0.0  # a new run: its passes earn their own credit
        self._owner = threading.get_ident()
        try:
            yield
        finally:
            self._owner = outer
            self._lock.release()
            with self._cond:
                self._waiting -= 1
                self._cond.notify_all()

    def run(self, jobs: Sequence[Job], /) -> list[Generated | Scored]:
        """``engine.run(jobs)`` inside :meth:`inference`."""
        with self.inference():
            return self.engine.run(jobs)

    def stats(self) -> CoServeStats:
        """The counters so far."""
        return self._stats

    def set_slo_tpot_ms(self, ms: float | None, /) -> None:
        """Change the objective (None: none) for the passes to come.

        Raises:
            ConfigError: ``ms`` not positive.
        """
        self.slo_s = _slo_seconds(ms)

    def close(self, timeout: float | None = 60.0) -> None:
        """Cancel every queued or running training (checkpoints written), stop the
        background thread and detach from the engine.
        """
        with self._cond:
            self._closed = True
            for job in self._jobs:
                job.cancel()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.engine.after_pass == self._after_pass:
            self.engine.after_pass = None

    # -------------------------------------------------------------- background
    def _background(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or (self._jobs and not self._waiting))
                if not self._jobs:
                    return
                job = self._jobs[0]
                # back-to-back inference comes within microseconds: a grace period keeps
                # the background from taking the model (and a GIL switch) between batches
                if not self._closed and not job._cancel and self._cond.wait_for(
                        lambda: self._waiting > 0 or self._closed, timeout=self.idle_delay):
                    continue
            with self._lock:
                if self._waiting and not job._cancel:
                    continue  # inference came first: it takes the model
                self._idle_piece(job)

    def _idle_piece(self, job: CoServeJob) -> None:
        trainer = self._stopping_or_done(job)
        if trainer is None:
            return
        tokens = self.idle_tokens or trainer.chunk_tokens
        layers = self.idle_layers or max(1, trainer.layers // 4)
        slo = self.slo_s
        if slo is not None:  # a query arriving now waits for this piece: keep it in the SLO
            fit_tokens = self.model.forward_tokens_within(self.headroom * slo,
                                                          trainer.forwarded_tokens)
            fit_layers = self.model.backward_layers_within(self.headroom * slo,
                                                           trainer.sequence_tokens)
            # never below a probe's size: a piece's fixed cost makes tinier ones a waste
            tokens = tokens if fit_tokens is None else min(tokens,
                                                           max(self.probe_tokens, fit_tokens))
            layers = layers if fit_layers is None else min(layers, max(1, fit_layers))
        seconds, ran = self._piece(job, tokens, layers)
        self._stats = replace(self._stats,
                              background_seconds=self._stats.background_seconds + seconds,
                              background_tokens=self._stats.background_tokens + ran)
        self._after_piece(job)

    # -------------------------------------------------------------------- hook
    def _after_pass(self, step: StepTime) -> None:
        """The engine's ``after_pass``: count the pass, then run one sized piece."""
        self.model.add_step(step)
        stats = self._stats
        stats = replace(stats, inference_passes=stats.inference_passes + 1,
                        inference_seconds=stats.inference_seconds + step.seconds)
        job = self._jobs[0] if self._jobs else None
        seconds = ran = 0
        piece = False
        credit = self._left(step)
        if job is not None and self.interleave and self._owner == threading.get_ident():
            trainer = self._stopping_or_done(job)
            if trainer is not None:
                tokens, layers = self.piece_size(trainer, step)
                if (tokens if trainer.next_piece == "forward" else layers) > 0:
                    seconds, ran = self._piece(job, tokens, layers)
                    piece = True
                    self._after_piece(job)
        if credit is not None:
            self._credit = credit - seconds
        slo = self.slo_s
        missed = slo is not None and step.seconds + seconds > slo
        self._stats = replace(stats, finetune_seconds=stats.finetune_seconds + seconds,
                              finetune_tokens=stats.finetune_tokens + ran,
                              iterations=stats.iterations + piece,
                              slo_misses=stats.slo_misses + missed)

    def _left(self, step: StepTime) -> float | None:
        """Seconds a piece after ``step`` may take (None: no objective): the pass's share
        of the objective left over, plus the credit earlier passes of this run left unused
        (capped at ``burst`` objectives; ``burst`` 0: this pass alone).
        """
        slo = self.slo_s
        if slo is None:
            return None
        left = self.headroom * slo - step.seconds
        if self.burst > 0:
            left = min(self._credit + left, self.burst * slo)
        return left

    def piece_size(self, trainer: Trainer, step: StepTime) -> tuple[int, int]:
        """The piece that runs after the inference pass ``step``: (forward tokens,
        backward layers); which one applies depends on ``trainer.next_piece``. A count of
        0 runs nothing (see the module docstring for the rule).
        """
        tokens = plan_iteration(step.tokens, self.token_budget,
                                trainer.pending_forward_tokens, self.max_finetune_tokens)
        left = self._left(step)
        if left is None:
            return tokens, self.backward_layers
        if left <= 0:
            return 0, 0
        fit_tokens = self.model.forward_tokens_within(left, trainer.forwarded_tokens)
        if fit_tokens is None:
            tokens = min(tokens, self.probe_tokens)
        elif fit_tokens < min(self.probe_tokens, tokens):
            tokens = 0  # a piece this small is mostly fixed cost: save the credit up
        else:
            tokens = min(tokens, fit_tokens)
        fit_layers = self.model.backward_layers_within(left, trainer.sequence_tokens)
        layers = 1 if fit_layers is None else min(fit_layers, trainer.layers)
        return tokens, layers

    # ------------------------------------------------------------------ pieces
    def _piece(self, job: CoServeJob, tokens: int, layers: int) -> tuple[float, int]:
        """Run one piece of ``job`` (the caller holds the model), measure it, feed the
        step-time model; returns (seconds, tokens forwarded). A failure ends the job.
        """
        trainer = job.trainer
        kind, forwarded = trainer.next_piece, trainer.forwarded_tokens
        length = trainer.sequence_tokens
        layers_before = trainer.pending_backward_layers
        switch = job.activate(True) if job.activate is not None else contextlib.nullcontext()
        _sync()
        start = time.perf_counter()
        try:
            with switch:
                ran = trainer.work(tokens, layers)
            _sync()
        except Exception as exc:  # the run fails, the engine and other runs go on
            job.error = exc
            self._finish(job)
            return time.perf_counter() - start, 0
        seconds = time.perf_counter() - start
        if kind == "forward" and ran:
            self.model.add(FORWARD, ran, forwarded + ran, seconds)
        elif kind == "backward":
            done_layers = layers_before - trainer.pending_backward_layers
            if done_layers > 0:
                self.model.add(BACKWARD, done_layers * length, 0, seconds)
        return seconds, ran

    def _stopping_or_done(self, job: CoServeJob) -> Trainer | None:
        """The job's trainer, or None after ending the job (cancelled, or done)."""
        trainer = job.trainer
        if job._cancel:
            try:
                trainer.interrupt()
            except Exception as exc:  # a failed checkpoint is the run's error
                job.error = exc
            job.cancelled = job.error is None
            self._finish(job)
            return None
        if trainer.done:
            self._finish(job)
            return None
        return trainer

    def _after_piece(self, job: CoServeJob) -> None:
        trainer = job.trainer
        if job.on_progress is not None and trainer.step != job._reported_step:
            job._reported_step = trainer.step
            job.on_progress(trainer)
        if trainer.done and not job.done():
            self._finish(job)

    def _finish(self, job: CoServeJob) -> None:
        with self._cond:
            if job in self._jobs:
                self._jobs.remove(job)
            self._cond.notify_all()
        job._finished.set()


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _slo_seconds(ms: float | None) -> float | None:
    if ms is None:
        return None
    if not ms > 0:
        msg = f"slo_tpot_ms = {ms} is not positive; pass milliseconds > 0, or None for none"
        raise ConfigError(msg)
    return ms / 1000.0


def _check(token_budget: int, max_finetune_tokens: int, backward_layers: int,
           headroom: float, probe_tokens: int) -> None:
    problems = [
        (token_budget < 1, f"token_budget = {token_budget}; pass >= 1"),
        (max_finetune_tokens < 0, f"max_finetune_tokens = {max_finetune_tokens}; pass >= 0"),
        (backward_layers < 1, f"backward_layers = {backward_layers}; pass >= 1"),
        (not 0 < headroom <= 1, f"headroom = {headroom}; pass a share in (0, 1]"),
        (probe_tokens < 1, f"probe_tokens = {probe_tokens}; pass >= 1"),
    ]
    for bad, problem in problems:
        if bad:
            msg = f"CoServer: {problem}"
            raise ConfigError(msg)
