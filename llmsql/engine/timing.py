"""Step-time measurement: the wall time of every forward pass the engine runs, with the
shape figures a cost model is fitted on.

Attach a :class:`StepTimer` to an :class:`~llmsql.engine.runner.Engine` (``engine.timer =
StepTimer()``); every forward pass then appends a :class:`StepTime`. The figures are those
the cost models of the seed papers use: a prefill's ``A + B·Σl + C·Σl²`` needs ``tokens``
(``Σl``) and ``tokens_sq`` (``Σl²``), a decode step's ``α + β·B + γ·ΣL_ctx`` needs ``rows``
(``B``) and ``context`` (``ΣL_ctx``). On a GPU the timer synchronizes the device before and
after the pass, so a step's time is its own (that costs a little speed: attach it to
profile, not in production runs).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import torch

KINDS: tuple[str, ...] = ("prefix", "prefill", "decode", "score")
"""Step kinds: a batch's shared prefixes, its prompts (suffixes after a shared prefix), one
decode step, and the forward pass that scores constrained choices."""


@dataclass(frozen=True, slots=True)
class StepTime:
    """One forward pass: what it computed and how long it took."""

    kind: str
    """One of :data:`KINDS`."""
    rows: int
    """Rows in the batch (padding rows of finished requests included: they are computed)."""
    tokens: int
    """New tokens computed, padding excluded (``Σl``)."""
    tokens_sq: int
    """Sum over rows of the square of each row's new tokens (``Σl²``)."""
    context: int
    """Tokens attended to: each row's cached plus new tokens, padding excluded (``ΣL_ctx``)."""
    seconds: float


@dataclass(slots=True)
class StepTimer:
    """Collects a :class:`StepTime` per forward pass (see the module docstring)."""

    steps: list[StepTime] = field(default_factory=list)

    @contextlib.contextmanager
    def step(self, kind: str, new: torch.Tensor, full: torch.Tensor) -> Iterator[None]:
        """Time the forward pass run inside the block.

        Args:
            kind: One of :data:`KINDS`.
            new: (rows, new columns) mask, 1 for a real new token.
            full: (rows, cache + new columns) mask, 1 for a real token.
        """
        per_row = new.sum(-1)
        rows, tokens = int(new.shape[0]), int(per_row.sum())
        tokens_sq, context = int((per_row * per_row).sum()), int(full.sum())
        sync = _synchronizer(new)
        sync()
        start = time.perf_counter()
        yield
        sync()
        self.steps.append(StepTime(kind, rows, tokens, tokens_sq, context,
                                   time.perf_counter() - start))

    def of_kind(self, kind: str) -> list[StepTime]:
        """The recorded steps of one kind, in order."""
        return [s for s in self.steps if s.kind == kind]

    def clear(self) -> None:
        """Forget the recorded steps."""
        self.steps.clear()


def _synchronizer(tensor: torch.Tensor) -> Callable[[], None]:
    """``torch.cuda.synchronize`` for a tensor on a GPU, else a no-op."""
    if tensor.is_cuda:
        import torch

        return torch.cuda.synchronize
    return _nothing


def _nothing() -> None:
    return None
