"""A step-time model fitted from measured passes: ``seconds = a + b * tokens + c * context``
per kind of pass, by least squares over the newest measurements, refitted as they come.

Kinds: the engine's inference passes (:data:`llmsql.engine.timing.KINDS`, fed with
:class:`~llmsql.engine.timing.StepTime`: ``tokens`` is ``Σl``, ``context`` is
``ΣL_ctx``), and the fine-tuning pieces:

- :data:`FORWARD`: a forward piece of ``k`` tokens after ``f`` already forwarded tokens of
  the same sequence: ``tokens = k``, ``context = f + k`` (what the piece's last token attends
  to, as the step timer counts one row);
- :data:`BACKWARD`: the backward of ``n`` layers of a sequence of ``L`` tokens:
  ``tokens = n * L`` (layer-tokens), ``context = 0``.

The fit guards against nonsense from few or collinear points: a feature that does not vary
is dropped, a negative slope is dropped and the rest refitted, a negative intercept refits
through the origin, and a single point (or figures that never varied) gives a proportional
model ``seconds = b * tokens`` (it overestimates larger pieces and underestimates smaller
ones; pieces of varied sizes soon give a line). With no point a kind has no prediction
(None): the co-serving loop then runs a small probe piece and measures it.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from llmsql.engine.timing import StepTime

FORWARD = "finetune_forward"
"""The kind of a fine-tuning forward piece."""
BACKWARD = "finetune_backward"
"""The kind of a fine-tuning backward piece."""

_MIN_SECONDS = 1e-9


@dataclass(frozen=True, slots=True)
class Fit:
    """A fitted line: ``seconds = a + b * tokens + c * context``."""

    a: float
    b: float
    c: float
    points: int
    """Measurements it was fitted on."""

    def predict(self, tokens: float, context: float = 0.0) -> float:
        """Predicted seconds of a pass with these figures."""
        return self.a + self.b * tokens + self.c * context


class StepTimeModel:
    """Per-kind least-squares step times (see the module docstring); thread-safe.

    Args:
        window: Measurements kept per kind (the newest; older ones age out, so the model
            follows a changing machine).
    """

    def __init__(self, *, window: int = 512) -> None:
        """An empty model."""
        self._points: dict[str, deque[tuple[float, float, float]]] = {}
        self._fits: dict[str, Fit | None] = {}
        self._window = window
        self._lock = threading.Lock()

    def add(self, kind: str, tokens: int, context: int, seconds: float) -> None:
        """Record one measured pass of ``kind``."""
        with self._lock:
            points = self._points.setdefault(kind, deque(maxlen=self._window))
            points.append((float(tokens), float(context), max(float(seconds), 0.0)))
            self._fits.pop(kind, None)

    def add_step(self, step: StepTime) -> None:
        """Record an engine pass measured by the step timer."""
        self.add(step.kind, step.tokens, step.context, step.seconds)

    def points(self, kind: str) -> int:
        """Measurements held for ``kind``."""
        with self._lock:
            return len(self._points.get(kind, ()))

    def fit(self, kind: str) -> Fit | None:
        """The current fit of ``kind`` (None: no measurement yet)."""
        with self._lock:
            if kind not in self._fits:
                self._fits[kind] = _fit(list(self._points.get(kind, ())))
            return self._fits[kind]

    def predict(self, kind: str, tokens: int, context: int = 0) -> float | None:
        """Predicted seconds of a pass of ``kind`` (None: no measurement of that kind)."""
        fit = self.fit(kind)
        return None if fit is None else max(fit.predict(tokens, context), 0.0)

    def error(self, kind: str) -> float | None:
        """The current fit's mean relative error over the held measurements of ``kind``
        (``mean(|predicted - measured| / measured)``; None: no measurement).
        """
        fit = self.fit(kind)
        with self._lock:
            points = [p for p in self._points.get(kind, ()) if p[2] > 0]
        if fit is None or not points:
            return None
        return sum(abs(fit.predict(t, c) - s) / s for t, c, s in points) / len(points)

    def forward_tokens_within(self, seconds: float, forwarded: int) -> int | None:
        """The most forward tokens a piece may run after ``forwarded`` tokens of its
        sequence and take at most ``seconds`` (0 when not even one token fits; None: no
        measurement yet).
        """
        fit = self.fit(FORWARD)
        if fit is None:
            return None
        per_token = fit.b + fit.c
        left = seconds - fit.a - fit.c * forwarded
        if left <= 0:
            return 0
        if per_token <= 0:
            return 1 << 30
        return max(0, math.floor(left / per_token))

    def backward_layers_within(self, seconds: float, sequence_tokens: int) -> int | None:
        """The most layers whose backward (a sequence of ``sequence_tokens``) fits in
        ``seconds`` (0: not one; None: no measurement yet).
        """
        fit = self.fit(BACKWARD)
        if fit is None:
            return None
        per_layer = fit.b * sequence_tokens
        left = seconds - fit.a
        if left <= 0:
            return 0
        if per_layer <= 0:
            return 1 << 30
        return max(0, math.floor(left / per_layer))


def _fit(points: list[tuple[float, float, float]]) -> Fit | None:
    """Least squares over ``(tokens, context, seconds)`` with the guards of the module
    docstring.
    """
    if not points:
        return None
    data = torch.tensor(points, dtype=torch.float64)
    x, y = data[:, :2], data[:, 2]
    features = [j for j in (0, 1) if float(x[:, j].max() - x[:, j].min()) > 0]
    intercept = True
    while True:
        if not features:  # the figures never varied: a slope cannot be told from noise
            return _proportional(x, y, len(points))
        coef = _solve(x, y, features, intercept=intercept)
        if coef is None:
            return _proportional(x, y, len(points))
        slopes = dict(zip(features, coef[1:] if intercept else coef, strict=True))
        negative = [j for j, v in slopes.items() if v < 0]
        if negative:
            features = [j for j in features if j not in negative]
            continue
        a = coef[0] if intercept else 0.0
        if a < 0:
            intercept = False
            continue
        return Fit(max(a, 0.0), slopes.get(0, 0.0), slopes.get(1, 0.0), len(points))


def _solve(x: torch.Tensor, y: torch.Tensor, features: list[int], *,
           intercept: bool) -> list[float] | None:
    columns = ([torch.ones_like(y)] if intercept else []) + [x[:, j] for j in features]
    if not columns or len(y) < len(columns):
        return None
    design = torch.stack(columns, dim=1)
    solution = torch.linalg.lstsq(design, y[:, None], driver="gelsd").solution[:, 0]
    return [float(v) for v in solution]


def _proportional(x: torch.Tensor, y: torch.Tensor, points: int) -> Fit:
    """``seconds = b * tokens`` through the mean ratio (or a constant when tokens are 0)."""
    tokens = float(x[:, 0].sum())
    if tokens > 0:
        return Fit(0.0, max(float(y.sum()) / tokens, _MIN_SECONDS), 0.0, points)
    return Fit(float(y.mean()), 0.0, 0.0, points)
