"""``auto``'s measurements: the plan to run each step, from the cost model first, then from
measured step times (no torch).

A batch run takes many steps of similar size, so ``auto`` can afford to check the cost model:
per step-size bucket (tokens per step, by powers of two) it runs the cost model's choice, then
each other candidate plan for ``probe`` counted steps (the first step after a switch is not
counted: the cache it starts with was filled for the other plan), and from then on the
candidate with the lowest median step time. A wrong prior (the predictor's accuracy, the
per-layer overhead) then costs a few steps, not the run.

>>> trials = PlanTrials(("layer_sweep", "lru"), probe=1)
>>> trials.choose(8, "lru")
'lru'
>>> trials.record(8, "lru", 0.5, counted=True)
>>> trials.choose(8, "lru")
'layer_sweep'
>>> trials.record(8, "layer_sweep", 0.3, counted=True)
>>> trials.choose(8, "lru"), trials.choose(300, "lru")
('layer_sweep', 'lru')
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence


class PlanTrials:
    """Step times per (bucket, plan) and the choice they imply (see the module docstring)."""

    def __init__(self, candidates: Sequence[str], *, probe: int = 2) -> None:
        self.candidates = tuple(candidates)
        self.probe = probe
        self._times: dict[tuple[int, str], list[float]] = {}

    @staticmethod
    def bucket(tokens: int) -> int:
        """Steps of 2^(b-1) to 2^b - 1 tokens share bucket ``b``."""
        return max(tokens, 1).bit_length()

    def record(self, tokens: int, plan: str, seconds: float, *, counted: bool) -> None:
        """A finished step's time (kept only when ``counted``)."""
        if counted and plan in self.candidates:
            self._times.setdefault((self.bucket(tokens), plan), []).append(seconds)

    def times(self, tokens: int, plan: str) -> list[float]:
        """The counted step times of ``plan`` in ``tokens``' bucket."""
        return list(self._times.get((self.bucket(tokens), plan), []))

    def choose(self, tokens: int, model_choice: str) -> str:
        """The plan for a step of ``tokens`` tokens: an untried candidate (the cost model's
        first), else the fastest measured.
        """
        order = [model_choice] + [p for p in self.candidates if p != model_choice]
        order = [p for p in order if p in self.candidates] or [model_choice]
        for plan in order:
            if len(self.times(tokens, plan)) < self.probe:
                return plan
        return min(order, key=lambda p: statistics.median(self.times(tokens, p)))
