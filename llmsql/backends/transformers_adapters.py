"""LoRA adapters on the transformers backend: serving them per request, training them.

**Serving.** A request's :class:`~llmsql.backends.base.AdapterRef` is loaded onto the engine's
model once per digest (PEFT files, :class:`llmsql.engine.finetune.serve.AdapterBank`, a few
kept loaded, least recently used first out) and switched on for its rows only: the backend
runs a batch as one engine run per adapter (base rows together, without any adapter), so a
shared prompt prefix is never computed under one adapter for another's rows, and base rows
give the answers of a model without adapters (a LoRA layer with its adapters off computes
its base layer; probabilities may move by float rounding only, as a CPU GEMM's rounding
depends on its buffers' memory alignment). A ``digest`` written in hex must be
(a prefix of) the sha256 of ``adapter_model.safetensors``: a folder whose weights changed
since is refused (a result cached under the old digest would not be its answer).

**Training** (:class:`TrainingRun`, started by the backend's ``start_training``): each
example becomes one sequence of exactly the tokens inference sees: the prompt's ids (chat
template included, as ``generate`` runs them), then the answer's ids and the first stop token
(what constrained choice scores, and what free generation must produce to stop there); the
prompt's tokens carry no loss. A fresh LoRA adapter named after the job
(:func:`training_name`) is added to the model and trained by
:class:`llmsql.engine.finetune.train.Trainer` through the backend's
:class:`llmsql.engine.finetune.coserve.CoServer`: after each inference pass a fine-tuning
piece sized to the pass's leftover budget, and alone in a background thread while no query
runs. The training adapter is switched on for its pieces only, so queries (base rows and
other adapters) never see it. At the end its PEFT files are written atomically into the
job's ``out_dir`` and it is taken off the model (requests then load it from those files by
digest). A run that fails or is cancelled leaves its checkpoint in ``checkpoint_dir``; a
later run of the same job resumes from it.

torch, peft and :mod:`llmsql.engine` are imported only inside functions.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from typing import TYPE_CHECKING, Any

from llmsql.backends.base import (
    AdapterRef,
    CoServeStats,
    TrainProgress,
    TrainResult,
)
from llmsql.errors import ConfigError, ExecutionError, LLMSQLError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from llmsql.backends.base import TrainExample, TrainJob
    from llmsql.engine import Engine
    from llmsql.engine.finetune.coserve import CoServeJob, CoServer
    from llmsql.engine.finetune.serve import AdapterBank
    from llmsql.engine.finetune.train import Trainer, TrainSeq

logger = logging.getLogger(__name__)

_HEX = re.compile(r"[0-9a-f]{8,64}")


def served_name(digest: str, /) -> str:
    """The PEFT adapter name a served adapter gets on the model (from its digest).

    >>> served_name("3f2a9c0d1e2b4a5c6d7e8f90")
    'served_3f2a9c0d1e2b4a5c6d7e8f90'
    """
    return "served_" + re.sub(r"[^A-Za-z0-9_]", "_", digest)[:40]


class AdapterHost:
    """The LoRA adapters of one backend's model: served ones (by digest), which one runs,
    and training co-served with queries (the co-server is created at the first run).

    Every use of the model holds :meth:`model_lock`: the co-server's inference lock once it
    exists (training pieces then run between that holder's passes), else nothing (the
    backend's own lock serializes its calls).

    Args:
        engine: The backend's engine (adapters go into its model when first needed).
        capacity: Served adapters kept loaded at once (the least recently used goes first).
    """

    def __init__(self, engine: Engine, /, *, capacity: int = 8) -> None:
        """No adapter is loaded (peft is imported at the first adapter)."""
        self.engine = engine
        self.capacity = capacity
        self.server: CoServer | None = None
        self.slo_tpot_ms: float | None = None
        self._bank: AdapterBank | None = None

    @property
    def bank(self) -> AdapterBank:
        """The model's adapters (created, and peft imported, on first use)."""
        if self._bank is None:
            from llmsql.engine.finetune.serve import AdapterBank

            self._bank = AdapterBank(self.engine.model, capacity=self.capacity)
        return self._bank

    def activate(self, ref: AdapterRef | None, /) -> str | None:
        """Run ``ref`` from now on (None: the base model); load it first if needed.

        Returns:
            None, or why the adapter cannot run (its name, its folder and how to fix it):
            the error of every request that asked for it.
        """
        if ref is None:
            if self._bank is not None:
                self._bank.use(None)
            return None
        name = served_name(ref.digest)
        try:
            if name not in self.bank:
                _check_digest(ref)
                self.bank.load(name, ref.path, label=ref.name)
            self.bank.use(name)
        except ConfigError as exc:
            return str(exc)
        return None

    # ----------------------------------------------------------- co-serving
    def model_lock(self) -> contextlib.AbstractContextManager[Any]:
        """Hold the model (re-entrant) for a run of inference or an adapter change."""
        return self.server.inference() if self.server is not None else contextlib.nullcontext()

    def coserver(self) -> CoServer:
        """The co-server, attached to the engine on first use."""
        if self.server is None:
            from llmsql.engine.finetune.coserve import CoServer

            self.server = CoServer(self.engine, slo_tpot_ms=self.slo_tpot_ms)
        return self.server

    def set_slo_tpot_ms(self, ms: float | None, /) -> None:
        """Change the objective (None: none).

        Raises:
            ConfigError: ``ms`` not positive.
        """
        if ms is not None and not ms > 0:
            msg = f"slo_tpot_ms = {ms} is not positive; pass milliseconds > 0, or None"
            raise ConfigError(msg)
        self.slo_tpot_ms = ms
        if self.server is not None:
            self.server.set_slo_tpot_ms(ms)

    def stats(self) -> CoServeStats:
        """The co-server's counters (zeros before the first training run)."""
        if self.server is None:
            return CoServeStats()
        s = self.server.stats()
        return CoServeStats(inference_seconds=s.inference_seconds,
                            finetune_seconds=s.finetune_seconds,
                            finetune_tokens=s.finetune_tokens, iterations=s.iterations,
                            slo_misses=s.slo_misses)

    def close(self) -> None:
        """Cancel the training runs (checkpoints written) and detach from the engine."""
        if self.server is not None:
            self.server.close()


def _check_digest(ref: AdapterRef) -> None:
    from llmsql.engine.finetune.serve import WEIGHTS_FILE, file_digest

    if not _HEX.fullmatch(ref.digest):
        return
    path = f"{ref.path.rstrip('/')}/{WEIGHTS_FILE}"
    try:
        actual = file_digest(path)
    except OSError as exc:
        msg = (f"adapter {ref.name!r}: cannot read {path} ({exc}); re-create the adapter "
               "(DROP ADAPTER, then CREATE ADAPTER) or fix its path")
        raise ConfigError(msg) from exc
    if not actual.startswith(ref.digest):
        msg = (f"adapter {ref.name!r}: the weights in {path} changed since the adapter was "
               f"recorded (digest {ref.digest[:16]}, file {actual[:16]}); re-create the "
               "adapter (DROP ADAPTER, then CREATE ADAPTER)")
        raise ConfigError(msg)


# ------------------------------------------------------------------------ training
def training_name(job_name: str, /) -> str:
    """The PEFT adapter name a training run's adapter gets on the model (from the job's
    name, so a resumed run finds its checkpoint's parameters under the same names).

    >>> training_name("fresh-reviews")
    'train_fresh_reviews'
    """
    return "train_" + re.sub(r"[^A-Za-z0-9_]", "_", job_name)


def train_sequences(examples: Sequence[TrainExample], /, *,
                    prompt_ids: Callable[[str], list[int]],
                    answer_ids: Callable[[str], list[int]], max_len: int,
                    what: str = "training") -> list[TrainSeq]:
    """Turn labelled rows into training sequences: prompt ids (no loss), then the answer's.

    Args:
        examples: The rows.
        prompt_ids: A prompt's token ids as inference runs them (chat template included).
        answer_ids: An answer's token ids as inference produces them (stop token included).
        max_len: The longest sequence the model takes.
        what: ``training`` or ``holdout``, for messages.

    Raises:
        ConfigError: an answer that is not one of its request's choices, an empty answer,
            or a row too long for ``max_len``.
    """
    from llmsql.engine.finetune.step import IGNORE
    from llmsql.engine.finetune.train import TrainSeq

    out = []
    for k, ex in enumerate(examples):
        choices = ex.request.choices
        if choices is not None and ex.answer not in choices:
            msg = (f"{what} row {k}: the answer {ex.answer!r} is not one of the call's "
                   f"choices {list(choices)}; render the label as one of them")
            raise ConfigError(msg)
        prompt, answer = prompt_ids(ex.request.prompt), answer_ids(ex.answer)
        if not answer:
            msg = f"{what} row {k}: the answer {ex.answer!r} has no tokens; give a label"
            raise ConfigError(msg)
        if len(prompt) + len(answer) > max_len:
            msg = (f"{what} row {k} takes {len(prompt) + len(answer)} tokens with its answer "
                   f"but max_model_len is {max_len}; shorten the prompt or raise max_model_len")
            raise ConfigError(msg)
        out.append(TrainSeq(tuple(prompt + answer), (IGNORE,) * len(prompt) + tuple(answer)))
    return out


class TrainingRun:
    """A training run on the transformers backend (a :class:`~llmsql.backends.base
    .TrainHandle`); built by :func:`start_training`.
    """

    def __init__(self, job: TrainJob, name: str, trainer: Trainer, *, host: AdapterHost,
                 base_model: str,
                 on_progress: Callable[[TrainProgress], None] | None) -> None:
        """Submit ``trainer`` (adapter ``name`` on ``host``'s model) to the co-server."""
        self.job, self.name, self.trainer = job, name, trainer
        self._host, self._base_model = host, base_model
        self._on_progress = on_progress
        self._started = time.monotonic()
        self._result: TrainResult | None = None
        self._error: LLMSQLError | None = None
        self._done = threading.Event()
        self._job: CoServeJob = host.coserver().submit(
            trainer, activate=self._activate, on_progress=self._progress)
        self._finisher = threading.Thread(target=self._finish, daemon=True,
                                          name=f"llmsql-train-{job.name}")
        self._finisher.start()

    # -------------------------------------------------------------- the handle
    @property
    def resumed_from(self) -> int:
        """The step a checkpoint restored (0: from scratch)."""
        return self.trainer.resumed_from

    def done(self) -> bool:
        """True once it finished (adapter written), failed or was cancelled."""
        return self._done.is_set()

    def progress(self) -> TrainProgress:
        """Where it is now."""
        t = self.trainer
        return TrainProgress(t.step, t.steps, t.last_loss, t.tokens,
                             time.monotonic() - self._started)

    def result(self, timeout: float | None = None) -> TrainResult:
        """Wait for the end; return what was trained.

        Raises:
            ExecutionError: it failed (why), was cancelled (the checkpoint stays for a
                resume), or ``timeout`` seconds passed first.
        """
        if not self._done.wait(timeout):
            t = self.trainer
            msg = (f"training adapter {self.job.name!r} is still running after {timeout} s "
                   f"(step {t.step} of {t.steps}); wait longer or cancel it")
            raise ExecutionError(msg)
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        """Stop at the next piece boundary; the checkpoint of the last finished step is
        written for a resume (:meth:`result` then raises).
        """
        self._job.cancel()

    # ---------------------------------------------------------------- internals
    def _activate(self, on: bool) -> contextlib.AbstractContextManager[None]:
        return self._host.bank.using(self.name) if on else contextlib.nullcontext()

    def _progress(self, trainer: Trainer) -> None:
        if self._on_progress is not None:
            try:
                self._on_progress(self.progress())
            except Exception:  # a caller's callback never stops training or a query
                logger.exception("on_progress of adapter %r failed", self.job.name)

    def _finish(self) -> None:
        try:
            trainer = self._wait()
            holdout = self._holdout_loss(trainer)
            with self._host.model_lock():
                digest = self._host.bank.save(self.name, self.job.out_dir,
                                              base_model=self._base_model)
            self._result = TrainResult(
                AdapterRef(self.job.name, self.job.out_dir, digest),
                tuple(trainer.loss_curve), holdout, trainer.steps, trainer.tokens,
                time.monotonic() - self._started, resumed_from=trainer.resumed_from)
        except LLMSQLError as exc:
            self._error = exc
        except Exception as exc:  # boundary: anything else becomes the run's error
            msg = f"training adapter {self.job.name!r} failed: {exc}"
            self._error = ExecutionError(msg)
            self._error.__cause__ = exc
        finally:
            with self._host.model_lock():
                self._host.bank.remove(self.name)
            self._done.set()

    def _holdout_loss(self, trainer: Trainer) -> float | None:
        """:meth:`Trainer.holdout_loss`, holding the model one sequence at a time (queries
        wait for one forward pass at most).
        """
        import torch

        losses = []
        for seq in trainer.holdout:
            ids = torch.tensor([seq.input_ids], device=trainer.device)
            labels = torch.tensor([seq.labels], device=trainer.device)
            with (self._host.model_lock(), self._host.bank.using(self.name),
                  torch.inference_mode()):
                losses.append(float(trainer.model(input_ids=ids, labels=labels).loss))
        return sum(losses) / len(losses) if losses else None

    def _wait(self) -> Trainer:
        try:
            return self._job.result()
        except ExecutionError as exc:
            msg = f"training adapter {self.job.name!r}: {exc}"
            raise ExecutionError(msg) from exc.__cause__


def start_training(job: TrainJob, /, *, host: AdapterHost,
                   sequences: Callable[[Sequence[TrainExample], str], list[TrainSeq]],
                   base_model: str,
                   on_progress: Callable[[TrainProgress], None] | None = None) -> TrainingRun:
    """Add a fresh adapter for ``job`` to the model and start training it (see the module
    docstring). The caller holds the backend's tokenizer; this takes the model's lock.

    Raises:
        ConfigError: no training example, an example that cannot be tokenized as asked, a
            target module the model lacks, the same job already training, or a checkpoint
            of another run in ``job.checkpoint_dir``.
    """
    from llmsql.engine.finetune.train import Trainer

    if not job.examples:
        msg = (f"adapter {job.name!r} has no training rows; the AS SELECT must return at "
               "least one labelled row")
        raise ConfigError(msg)
    train = sequences(job.examples, "training")
    holdout = sequences(job.holdout, "holdout")
    name, lora = training_name(job.name), job.lora
    if job.slo_tpot_ms is not None:
        host.set_slo_tpot_ms(job.slo_tpot_ms)
    host.coserver()
    bank = host.bank
    with host.model_lock():
        if name in bank:
            msg = (f"adapter {job.name!r} is already training on this backend; wait for its "
                   "result() or cancel() it first")
            raise ConfigError(msg)
        try:
            params = bank.add_trainable(name, rank=lora.rank, alpha=lora.alpha,
                                        target_modules=lora.target_modules,
                                        dropout=lora.dropout, seed=lora.seed)
        except ConfigError as exc:
            msg = f"adapter {job.name!r}: {exc}"
            raise ConfigError(msg) from exc
        try:
            trainer = Trainer(bank.model, params, train, lr=lora.lr, epochs=lora.epochs,
                              batch_size=lora.batch_size, seed=lora.seed, holdout=holdout,
                              checkpoint_dir=job.checkpoint_dir)
        except BaseException:
            bank.remove(name)
            raise
    return TrainingRun(job, name, trainer, host=host, base_model=base_model,
                       on_progress=on_progress)
