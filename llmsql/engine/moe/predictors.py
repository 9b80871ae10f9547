"""Predictors: which experts later layers will use, from what the current layer sees.

The protocol (:class:`Predictor`): ``predict(layer, hidden, top_k_index, lookahead)`` gets the
model layer index of the MoE layer running, its experts' input ``hidden`` (tokens, H: the
router's input) and the routing just decided (tokens, k); it returns, for the later MoE
layers up to ``lookahead`` ahead, a float tensor (E,) of scores: the expected number of the
step's tokens routed to each expert. The runtime prefetches the experts scoring at least 0.5,
best first.

- :class:`NoPredictor`: nothing (reactive loading; the ``lru`` baseline).
- :class:`NextRouter`: training-free, layer ``i+j``'s router applied to layer ``i``'s hidden
  states (as in FATE and Mixtral-offloading's speculative prefetch).
- :class:`Oracle`: replays a recorded routing log, with a chosen error rate (measurement
  only: it shows what a predictor of a given accuracy buys).
- ``learned``: :class:`llmsql.engine.moe.learned.LearnedPredictor`, a small network per
  layer trained on routing traces (``llmsql moe-profile``).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from collections.abc import Sequence


class Predictor(Protocol):
    """Predicts later layers' experts (see the module docstring)."""

    name: str

    def predict(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                lookahead: int) -> dict[int, torch.Tensor]:
        """Later MoE layer -> (E,) expected tokens per expert (see the module docstring)."""
        ...


def later_layers(layers: Sequence[int], layer: int, lookahead: int) -> list[int]:
    """The MoE layers after ``layer``, at most ``lookahead`` of them (no wrap-around).

    >>> later_layers([0, 1, 3, 5], 1, 2), later_layers([0, 1, 3, 5], 5, 2)
    ([3, 5], [])
    """
    after = [x for x in layers if x > layer]
    return after[:lookahead]


class NoPredictor:
    """Predicts nothing: experts load when the router asks for them."""

    name = "none"

    def predict(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                lookahead: int) -> dict[int, torch.Tensor]:
        """Scores for the later layers (see :class:`Predictor`)."""
        return {}


class NextRouter:
    """Layer ``i+j``'s router on layer ``i``'s hidden states: each token's top-k there,
    counted per expert.
    """

    name = "next_router"

    def __init__(self, routers: dict[int, torch.Tensor], top_k: int) -> None:
        """``routers``: MoE layer -> router weight (E, H), on the device the model runs on."""
        self.routers = dict(sorted(routers.items()))
        self.layers = list(self.routers)
        self.top_k = top_k

    def predict(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                lookahead: int) -> dict[int, torch.Tensor]:
        """Scores for the later layers (see :class:`Predictor`)."""
        out: dict[int, torch.Tensor] = {}
        for later in later_layers(self.layers, layer, lookahead):
            weight = self.routers[later]
            logits = hidden.to(weight.dtype) @ weight.T
            top = logits.topk(self.top_k, dim=-1).indices.reshape(-1)
            out[later] = torch.bincount(top, minlength=weight.shape[0]).float()
        return out


def routers_of(model: torch.nn.Module, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Each MoE layer's router weight (``model.layers[i].mlp.gate.weight``)."""
    base = model.get_submodule("model.layers")
    return {i: base[i].mlp.gate.weight.detach() for i in layers}  # type: ignore[index]


class Oracle:
    """Replays the experts each step really used (a log of ``(layer, experts)`` in run
    order, as :attr:`llmsql.engine.moe.offload.ExpertOffload.route_log` records), replacing
    each with a wrong one with probability ``error_rate``. For measurement only.
    """

    name = "oracle"

    def __init__(self, log: Sequence[tuple[int, Sequence[int]]], *, num_experts: int,
                 error_rate: float = 0.0, seed: int = 0) -> None:
        self.log = [(layer, tuple(experts)) for layer, experts in log]
        self.num_experts = num_experts
        self.error_rate = error_rate
        self._rng = random.Random(seed)
        self._at = 0

    def predict(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                lookahead: int) -> dict[int, torch.Tensor]:
        """Scores for the later layers (see :class:`Predictor`)."""
        self._sync(layer)
        out: dict[int, torch.Tensor] = {}
        for later, experts in self.log[self._at + 1:self._at + 1 + lookahead]:
            if later <= layer:
                break  # the next step: not this step's lookahead
            scores = torch.zeros(self.num_experts)
            for e in experts:
                scores[self._noisy(e)] += 1.0
            out[later] = scores
        self._at += 1
        return out

    def _sync(self, layer: int) -> None:
        """Advance to this layer's entry (tolerates a log that runs out or skips)."""
        n = len(self.log)
        for _ in range(n):
            if self._at < n and self.log[self._at][0] == layer:
                return
            self._at = (self._at + 1) % max(n, 1)

    def _noisy(self, expert: int) -> int:
        if self._rng.random() >= self.error_rate:
            return expert
        other = self._rng.randrange(self.num_experts - 1)
        return other if other < expert else other + 1
