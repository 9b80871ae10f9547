"""LoRA training on a list of token sequences, cut into pieces a co-serving loop can interleave
with inference passes of the same model (after FlexLLM), with atomic checkpoints and resume.

:class:`Trainer` trains ``params`` (e.g. from :func:`~llmsql.engine.finetune.attach_lora`;
PEFT's or the engine's adapters alike: they are just parameters) with AdamW on
:class:`TrainSeq` sequences:

- **Order.** Epoch ``e`` visits the sequences in the order ``torch.randperm(n)`` drawn from a
  generator seeded with ``seed * 1_000_003 + e``: a pure function of ``(seed, epoch)``, so a
  resumed run needs only the step number to continue the same order.
- **Steps.** Epoch ``e``'s order is cut into batches of ``batch_size`` sequences (the last
  batch of an epoch may be smaller); one optimizer step per batch, ``steps = epochs *
  ceil(n / batch_size)``.
- **Loss.** A step's loss is the **mean over the batch's sequences of each sequence's mean
  token loss** (each sequence: transformers' causal-LM loss, ``model(input_ids,
  labels=labels).loss``). Its gradient is the sum of the sequences' gradients (each
  accumulated by :class:`~llmsql.engine.finetune.step.ChunkedStep`) divided by the batch's
  size. The plain reference is ``(sum(model(ids_i, labels=labels_i).loss) / len(batch))
  .backward()`` then ``AdamW.step()``.
- **Pieces.** :meth:`Trainer.work` does the next piece: the forward of up to ``token_budget``
  tokens of the current sequence (``ChunkedStep.forward_some``), or the backward of up to
  ``layer_budget`` layers (``backward_some``); a piece that finishes a batch's last
  sequence also runs the optimizer step (and a checkpoint when one is due). It runs with
  grad enabled and inference mode off *locally*, and the model in training mode only for the
  piece (restored after), so it can run between inference passes of the same model, even
  from inside one (a hook called under ``torch.inference_mode()``).
- **Checkpoints** (``checkpoint_dir``): one file, ``trainer.pt``, written to a temporary
  file, fsynced and renamed into place (``os.replace``), then the folder fsynced: a crash or
  a full disk leaves the previous checkpoint. It holds the adapter parameters by name, the
  AdamW state, the step, the loss curve, the tokens counter and a fingerprint of the run
  (data, seed, epochs, batch size, lr). A new :class:`Trainer` on a folder holding a
  checkpoint of the same run resumes from it (``resumed_from``); one of another run is an
  error. A checkpoint is written every ``checkpoint_every`` steps, at the end, and when a
  run is interrupted (:meth:`Trainer.interrupt`; the step in progress is dropped and redone
  on resume). An interrupted and resumed run ends with the same adapter weights as an
  uninterrupted one (the order, the data and the optimizer state are all restored).

LoRA dropout draws from the global torch RNG and is not restored on resume; use dropout 0
where bit-equal resumes matter.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from llmsql.engine.finetune.step import IGNORE, ChunkedStep
from llmsql.engine.layers import num_layers
from llmsql.errors import ConfigError, ExecutionError
from llmsql.files import fsync_path

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable, Iterator, Sequence

    from torch import nn

CHECKPOINT_FILE = "trainer.pt"
"""The checkpoint's file name inside ``checkpoint_dir``."""

_ORDER_SEED_STRIDE = 1_000_003


@dataclass(frozen=True, slots=True)
class TrainSeq:
    """One training sequence: token ids and their labels (same length).

    ``labels[t]`` is the token position ``t`` holds for the loss (transformers' causal-LM
    convention: position ``t`` predicts ``labels[t + 1]``; :data:`IGNORE` (-100) counts for
    nothing, e.g. the prompt's tokens). Usually ``labels`` is ``input_ids`` with the prompt
    part set to -100.
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        """Check the lengths and that something is labelled."""
        if not self.input_ids or len(self.labels) != len(self.input_ids):
            msg = (f"TrainSeq has {len(self.input_ids)} input ids and {len(self.labels)} "
                   "labels; give a non-empty sequence with one label per token")
            raise ConfigError(msg)
        if all(label == IGNORE for label in self.labels[1:]):
            msg = ("TrainSeq has no label to predict (every label after the first token is "
                   "-100); label at least one answer token")
            raise ConfigError(msg)


class Trainer:
    """Trains ``params`` of ``model`` on ``train`` (see the module docstring).

    Args:
        model: A Llama-style causal LM (see :mod:`llmsql.engine.layers`).
        params: The parameters to train (every other parameter should be frozen); AdamW
            updates these only.
        train: The training sequences.
        lr: AdamW's learning rate.
        epochs: Passes over ``train``.
        batch_size: Sequences per optimizer step (gradient accumulation).
        seed: Seeds the epochs' orders.
        holdout: Sequences for :meth:`holdout_loss` (never trained on).
        checkpoint_dir: Where checkpoints go (None: none); resumes from one found there.
        checkpoint_every: Steps between checkpoints.
        chunk_tokens: Forward piece size of :meth:`run` (the co-serving loop sizes its own).
        device: Where the sequences' tensors go (default: where ``params`` are).
        weight_decay: AdamW's weight decay (default 0, as transformers' Trainer).

    Attributes:
        step: Optimizer steps done.
        steps: Optimizer steps in the whole run.
        tokens: Training tokens forwarded so far (a redone step's tokens count again).
        loss_curve: ``(step, loss)`` per optimizer step done (step counts from 1).
        resumed_from: The step a checkpoint restored (0: started from scratch).

    Raises:
        ConfigError: no parameter, no training sequence, a count below 1, ``lr`` <= 0, a
            parameter that is not the model's, or a checkpoint of another run in
            ``checkpoint_dir``.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[nn.Parameter],
        train: Sequence[TrainSeq],
        *,
        lr: float,
        epochs: int,
        batch_size: int,
        seed: int,
        holdout: Sequence[TrainSeq] = (),
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 50,
        chunk_tokens: int = 256,
        device: str | None = None,
        weight_decay: float = 0.0,
    ) -> None:
        """Set up the optimizer and resume from ``checkpoint_dir`` if it holds a checkpoint."""
        _check_options(params, train, lr, epochs, batch_size, checkpoint_every, chunk_tokens)
        self.model = model
        self.params = list(params)
        self.names = _param_names(model, self.params)
        self.train = tuple(train)
        self.holdout = tuple(holdout)
        self.epochs, self.batch_size, self.seed = epochs, batch_size, seed
        self.lr = lr
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every, self.chunk_tokens = checkpoint_every, chunk_tokens
        self.device = device if device is not None else str(self.params[0].device)
        self.layers = num_layers(model)  # type: ignore[arg-type]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.per_epoch = math.ceil(len(self.train) / batch_size)
        self.steps = epochs * self.per_epoch
        self.step = 0
        self.tokens = 0
        self.loss_curve: list[tuple[int, float]] = []
        self.resumed_from = 0
        self.fingerprint = _fingerprint(self.train, lr, epochs, batch_size, seed)
        self._order: tuple[int, list[int]] | None = None  # (epoch, its order)
        self._current: ChunkedStep | None = None  # the sequence in progress
        self._in_batch = 0  # sequences of the current batch finished
        self._batch_losses: list[float] = []
        if checkpoint_dir is not None:
            self._resume(checkpoint_dir)

    # ----------------------------------------------------------------- progress
    @property
    def done(self) -> bool:
        """Whether every optimizer step has run."""
        return self.step >= self.steps

    @property
    def last_loss(self) -> float | None:
        """The loss of the newest optimizer step (None before the first)."""
        return self.loss_curve[-1][1] if self.loss_curve else None

    @property
    def next_piece(self) -> str | None:
        """What :meth:`work` does next: ``"forward"``, ``"backward"``, or None when done."""
        if self.done:
            return None
        current = self._current
        if current is None or current.pending_forward_tokens:
            return "forward"
        return "backward"

    @property
    def pending_forward_tokens(self) -> int:
        """Tokens of the current sequence still to forward (the next sequence's length
        when none is in progress; 0 when done).
        """
        if self.done:
            return 0
        if self._current is None:
            return len(self._batch()[self._in_batch].input_ids)
        return self._current.pending_forward_tokens

    @property
    def forwarded_tokens(self) -> int:
        """Tokens of the current sequence already forwarded (what a forward piece attends
        to besides itself; 0 between sequences).
        """
        return 0 if self._current is None else self._current.forwarded

    @property
    def pending_backward_layers(self) -> int:
        """Layers of the current sequence whose backward is still to run (all of them until
        its forward ends; 0 between sequences).
        """
        return 0 if self._current is None else self._current.pending_backward_layers

    @property
    def sequence_tokens(self) -> int:
        """The current (or next) sequence's length; 0 when done."""
        if self.done:
            return 0
        if self._current is None:
            return len(self._batch()[self._in_batch].input_ids)
        return self._current.tokens

    # --------------------------------------------------------------------- work
    def work(self, token_budget: int, layer_budget: int = 1) -> int:
        """Do the next piece of training; returns the training tokens it forwarded.

        The piece is the forward of up to ``token_budget`` tokens of the current sequence,
        or (once all its tokens are forwarded) the backward of up to ``layer_budget``
        layers. The piece that ends a batch's last sequence also runs the optimizer step,
        and writes a checkpoint when one is due. A forward piece with ``token_budget`` 0
        (or a backward one with ``layer_budget`` 0) does nothing. Done: does nothing.

        Raises:
            ConfigError: a negative budget.
            ExecutionError: writing a checkpoint failed (the previous one stays).
        """
        if token_budget < 0 or layer_budget < 0:
            msg = (f"Trainer.work({token_budget}, {layer_budget}): pass budgets >= 0")
            raise ConfigError(msg)
        if self.done:
            return 0
        with self._training():
            current = self._start_sequence()
            if current.pending_forward_tokens:
                ran = current.forward_some(token_budget)
                self.tokens += ran
                return ran
            current.backward_some(layer_budget)
            if current.done:
                self._finish_sequence(current)
        return 0

    def run(self, stop: threading.Event | None = None,
            on_progress: Callable[[Trainer], None] | None = None) -> None:
        """Train to the end in big pieces (``chunk_tokens`` forward, every layer's backward
        at once), calling ``on_progress(self)`` after each optimizer step.

        When ``stop`` is set, stops before the next piece: the step in progress is dropped
        and a checkpoint of the last finished step written (:meth:`interrupt`).
        """
        while not self.done:
            if stop is not None and stop.is_set():
                self.interrupt()
                return
            before = self.step
            self.work(self.chunk_tokens, self.layers)
            if on_progress is not None and self.step != before:
                on_progress(self)

    def interrupt(self) -> None:
        """Drop the step in progress (its gradients) and write a checkpoint of the last
        finished step (when ``checkpoint_dir`` is set); :meth:`work` later redoes that step
        from its first sequence, with the same result.

        Raises:
            ExecutionError: writing the checkpoint failed (the previous one stays).
        """
        self._drop_step()
        self.save_checkpoint()

    def holdout_loss(self) -> float | None:
        """The mean over ``holdout`` of each sequence's mean token loss, computed without
        gradients (None when there is no holdout).
        """
        if not self.holdout:
            return None
        total = 0.0
        with torch.inference_mode():
            for seq in self.holdout:
                ids, labels = self._tensors(seq)
                total += float(self.model(input_ids=ids, labels=labels).loss)
        return total / len(self.holdout)

    # -------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        """Write a checkpoint of the last finished step into ``checkpoint_dir`` (atomic:
        temporary file, fsync, rename, fsync of the folder). Nothing when it is None.

        Raises:
            ExecutionError: the write failed (e.g. disk full); the previous checkpoint stays
                and no temporary file is left.
        """
        if self.checkpoint_dir is None:
            return
        state = {
            "fingerprint": self.fingerprint,
            "step": self.step,
            "tokens": self.tokens,
            "loss_curve": list(self.loss_curve),
            "params": {n: p.detach().cpu().clone() for n, p in zip(self.names, self.params,
                                                                 strict=True)},
            "optimizer": self.optimizer.state_dict(),
        }
        _atomic_save(state, self.checkpoint_dir)

    def _resume(self, folder: str) -> None:
        path = os.path.join(folder, CHECKPOINT_FILE)
        if not os.path.exists(path):
            return
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a checkpoint is never half-written; still say which
            msg = (f"the checkpoint {path} cannot be read ({exc}); delete it to start over")
            raise ExecutionError(msg) from exc
        if state.get("fingerprint") != self.fingerprint:
            msg = (f"{path} is a checkpoint of another training run (other data or "
                   "options); pass another checkpoint_dir, or delete it to start over")
            raise ConfigError(msg)
        if sorted(state["params"]) != sorted(self.names):
            msg = (f"the checkpoint {path} holds other adapter parameters than the model's; "
                   "pass the checkpoint_dir of this adapter")
            raise ConfigError(msg)
        with torch.no_grad():
            for name, p in zip(self.names, self.params, strict=True):
                p.copy_(state["params"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = self.resumed_from = int(state["step"])
        self.tokens = int(state["tokens"])
        self.loss_curve = [(int(s), float(v)) for s, v in state["loss_curve"]]

    # ------------------------------------------------------------------ helpers
    def _batch(self) -> list[TrainSeq]:
        """The sequences of the current step's batch."""
        epoch, index = divmod(self.step, self.per_epoch)
        if self._order is None or self._order[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * _ORDER_SEED_STRIDE + epoch)
            self._order = (epoch, torch.randperm(len(self.train), generator=gen).tolist())
        order = self._order[1][index * self.batch_size:(index + 1) * self.batch_size]
        return [self.train[k] for k in order]

    def _start_sequence(self) -> ChunkedStep:
        if self._current is None:
            if self._in_batch == 0:
                for p in self.params:
                    p.grad = None
            ids, labels = self._tensors(self._batch()[self._in_batch])
            self._current = ChunkedStep(self.model, ids, labels)  # type: ignore[arg-type]
        return self._current

    def _finish_sequence(self, current: ChunkedStep) -> None:
        self._batch_losses.append(current.loss)
        self._current, self._in_batch = None, self._in_batch + 1
        batch = len(self._batch())
        if self._in_batch < batch:
            return
        with torch.no_grad():
            for p in self.params:
                if p.grad is not None:
                    p.grad.div_(batch)
        self.optimizer.step()
        self.step += 1
        self.loss_curve.append((self.step, sum(self._batch_losses) / batch))
        self._drop_step()
        if self.step % self.checkpoint_every == 0 or self.done:
            self.save_checkpoint()

    def _drop_step(self) -> None:
        self._current, self._in_batch, self._batch_losses = None, 0, []
        for p in self.params:
            p.grad = None

    def _tensors(self, seq: TrainSeq) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor([seq.input_ids], dtype=torch.long, device=self.device)
        labels = torch.tensor([seq.labels], dtype=torch.long, device=self.device)
        return ids, labels

    @contextlib.contextmanager
    def _training(self) -> Iterator[None]:
        """Grad on, inference mode off, the model in training mode: for this piece only."""
        was_training = self.model.training
        with torch.inference_mode(False), torch.enable_grad():
            self.model.train()
            try:
                for p in self.params:
                    p.requires_grad_(True)
                yield
            finally:
                self.model.train(was_training)


def _check_options(params: Sequence[Any], train: Sequence[TrainSeq], lr: float, epochs: int,
                   batch_size: int, checkpoint_every: int, chunk_tokens: int) -> None:
    problems = [
        (not params, "no parameter to train; pass the adapter parameters attach_lora returns"),
        (not train, "no training sequence; pass at least one TrainSeq"),
        (not lr > 0, f"lr = {lr} is not positive; pass a learning rate such as 2e-4"),
        (epochs < 1, f"epochs = {epochs}; pass epochs >= 1"),
        (batch_size < 1, f"batch_size = {batch_size}; pass batch_size >= 1"),
        (checkpoint_every < 1, f"checkpoint_every = {checkpoint_every}; pass >= 1"),
        (chunk_tokens < 1, f"chunk_tokens = {chunk_tokens}; pass >= 1"),
    ]
    for bad, problem in problems:
        if bad:
            msg = f"Trainer: {problem}"
            raise ConfigError(msg)


def _param_names(model: nn.Module, params: Sequence[nn.Parameter]) -> list[str]:
    by_id = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    names = []
    for k, p in enumerate(params):
        name = by_id.get(id(p))
        if name is None:
            msg = (f"Trainer: parameter {k} (shape {tuple(p.shape)}) is not a parameter of "
                   f"{type(model).__name__}; pass the parameters attach_lora returned for it")
            raise ConfigError(msg)
        names.append(name)
    return names


def _fingerprint(train: Sequence[TrainSeq], lr: float, epochs: int, batch_size: int,
                 seed: int) -> str:
    digest = hashlib.sha256(repr((lr, epochs, batch_size, seed)).encode())
    for seq in train:
        digest.update(repr((seq.input_ids, seq.labels)).encode())
    return digest.hexdigest()


def _atomic_save(state: dict[str, Any], folder: str) -> None:
    final = os.path.join(folder, CHECKPOINT_FILE)
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".trainer-", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        tmp = None
        fsync_path(folder)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError
        msg = (f"writing the training checkpoint into {folder} failed ({exc}); the previous "
               "checkpoint is kept; free disk space or pass another checkpoint_dir")
        raise ExecutionError(msg) from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

