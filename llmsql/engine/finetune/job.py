"""What :class:`~llmsql.engine.finetune.coserve.CoServer` hands back: a submitted run's handle
(:class:`CoServeJob`) and the co-serving counters (:class:`CoServeStats`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmsql.errors import ExecutionError

if TYPE_CHECKING:
    import contextlib
    from collections.abc import Callable

    from llmsql.engine.finetune.train import Trainer


@dataclass(frozen=True, slots=True)
class CoServeStats:
    """What co-serving did since the co-server started (counters; take deltas)."""

    inference_seconds: float = 0.0
    """Time in inference forward passes (run inside :meth:`CoServer.inference`)."""
    finetune_seconds: float = 0.0
    """Time in fine-tuning pieces interleaved between inference passes."""
    finetune_tokens: int = 0
    """Training tokens forwarded in those interleaved pieces."""
    iterations: int = 0
    """Inference passes that had a fine-tuning piece after them."""
    slo_misses: int = 0
    """Inference passes whose time plus the piece after them exceeded the objective."""
    inference_passes: int = 0
    """Inference passes seen."""
    background_seconds: float = 0.0
    """Time in fine-tuning pieces while no inference ran."""
    background_tokens: int = 0
    """Training tokens forwarded while no inference ran."""


@dataclass(eq=False)
class CoServeJob:
    """A submitted training run (what :meth:`CoServer.submit` returns)."""

    trainer: Trainer
    activate: Callable[[bool], contextlib.AbstractContextManager[Any]] | None = None
    on_progress: Callable[[Trainer], None] | None = None
    error: BaseException | None = None
    """Why it failed (None: it did not)."""
    cancelled: bool = False
    """Whether it was cancelled (a checkpoint of its last finished step was written)."""
    started: float = field(default_factory=time.monotonic)
    _finished: threading.Event = field(default_factory=threading.Event)
    _cancel: bool = False
    _reported_step: int = -1

    def done(self) -> bool:
        """Whether it finished, failed or was cancelled."""
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until done (at most ``timeout`` seconds); returns whether it is done."""
        return self._finished.wait(timeout)

    def result(self, timeout: float | None = None) -> Trainer:
        """Wait for the end; return the trainer (its ``loss_curve``, weights in the model).

        Raises:
            ExecutionError: it failed (the cause chained), was cancelled, or ``timeout``
                passed first.
        """
        if not self._finished.wait(timeout):
            msg = (f"training is still running after {timeout} s (step "
                   f"{self.trainer.step} of {self.trainer.steps}); wait longer or cancel it")
            raise ExecutionError(msg)
        if self.cancelled:
            msg = (f"training was cancelled at step {self.trainer.step} of "
                   f"{self.trainer.steps}; its checkpoint is kept, run it again to resume")
            raise ExecutionError(msg)
        if self.error is not None:
            msg = (f"training failed at step {self.trainer.step} of {self.trainer.steps}: "
                   f"{self.error}")
            raise ExecutionError(msg) from self.error
        return self.trainer

    def cancel(self) -> None:
        """Ask it to stop before its next piece (then the step in progress is dropped and a
        checkpoint of the last finished step written); returns at once.
        """
        self._cancel = True
