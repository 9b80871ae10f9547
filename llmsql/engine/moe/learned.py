"""The learned expert predictor: one small network per MoE layer over the router's input.

After ProMoE's learned predictor and its third-party derivative (``sparse_llm_cache``): for
each MoE layer ``i`` an MLP reads the hidden state entering layer ``i``'s experts (the
router's input, standardized with the training tokens' mean and spread) and outputs, for
each of the next ``lookahead`` MoE layers, one logit per expert: the probability that the
token is routed there. Training minimizes binary cross-entropy against the multi-hot routing
recorded in a :class:`~llmsql.engine.moe.trace.RoutingTrace` (sigmoid outputs: each expert is
an independent yes/no, so the probabilities of one layer sum to about ``top_k``), with Adam
(lr 1e-3), dropout, and early stopping on the last 10% of the trace's tokens (held out,
whole prompts rather than scattered tokens, so the figures measure generalization).

``predict`` sums the token probabilities: for each later layer, the expected number of the
step's tokens routed to each expert (the :class:`~llmsql.engine.moe.predictors.Predictor`
protocol).

Quality is reported as :class:`PredictorMetrics` per lookahead distance ``j``: precision@k of
each token's predicted top-k set against its true top-k set at the ``j``-th next MoE layer
(recall@k equals it, both sets having ``k`` experts; recall at ``2k`` says how much a
prefetch of twice the experts catches), beside chance (``k/E``), the best fixed top-k (the
``k`` experts most used at that layer over the same tokens, the ceiling of any prediction
that ignores the token) and, given router weights, the training-free next-router predictor.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llmsql.engine.moe.predictors import later_layers
from llmsql.engine.moe.trace import RoutingTrace, bad_file, load_checked
from llmsql.errors import ConfigError

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

FORMAT = "llmsql-moe-predictor"
VERSION = 1
_FIX = "re-run `llmsql moe-profile` for this model to record routing and train it again"


@dataclass(frozen=True)
class DistanceMetrics:
    """Held-out quality at one lookahead distance, averaged over tokens and source layers.

    Attributes:
        distance: ``j``: predicting the ``j``-th MoE layer after the current one.
        precision: mean ``|predicted top-k ∩ true top-k| / k``.
        recall: mean ``|predicted top-k ∩ true top-k| / |true|`` (equals ``precision``).
        recall_2k: share of the true experts among the predicted top ``2k``.
        best_fixed_precision: precision of always predicting that layer's ``k`` most used
            experts (over the same tokens).
        next_router_precision: precision of layer ``i+j``'s router on layer ``i``'s hidden
            state, None without router weights.
    """

    distance: int
    precision: float
    recall: float
    recall_2k: float
    best_fixed_precision: float
    next_router_precision: float | None = None


@dataclass(frozen=True)
class PredictorMetrics:
    """What training measured (held-out tokens), stored beside the predictor."""

    num_experts: int
    top_k: int
    lookahead: int
    train_tokens: int
    heldout_tokens: int
    chance: float
    distances: tuple[DistanceMetrics, ...]
    epochs: int = 0
    loss: str = "bce"

    def at(self, distance: int) -> DistanceMetrics:
        """The figures at lookahead ``distance`` (KeyError if not measured)."""
        for d in self.distances:
            if d.distance == distance:
                return d
        raise KeyError(distance)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (:meth:`from_dict` reads it)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PredictorMetrics:
        """The metrics :meth:`to_dict` wrote."""
        distances = tuple(DistanceMetrics(**d) for d in data["distances"])
        return cls(**{**data, "distances": distances})


class _LayerNet(nn.Module):
    """Standardize, then Linear-ReLU-Dropout-Linear to ``targets * E`` logits."""

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, model_hidden: int, hidden_size: int, outputs: int, dropout: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(model_hidden))
        self.register_buffer("scale", torch.ones(model_hidden))
        self.net = nn.Sequential(nn.Linear(model_hidden, hidden_size), nn.ReLU(),
                                 nn.Dropout(dropout), nn.Linear(hidden_size, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net((x - self.mean) * self.scale)
        return out


class LearnedPredictor(nn.Module):
    """Per MoE layer MLPs predicting the next ``lookahead`` MoE layers' experts (a
    :class:`~llmsql.engine.moe.predictors.Predictor`).
    """

    name = "learned"

    def __init__(self, layers: Sequence[int], *, num_experts: int, top_k: int,
                 model_hidden: int, lookahead: int = 2, hidden_size: int = 256,
                 dropout: float = 0.2) -> None:
        super().__init__()
        self.layers = tuple(sorted(layers))
        self.num_experts, self.top_k, self.model_hidden = num_experts, top_k, model_hidden
        self.lookahead, self.hidden_size, self.dropout = lookahead, hidden_size, dropout
        self.nets = nn.ModuleDict({
            str(i): _LayerNet(model_hidden, hidden_size, len(t) * num_experts, dropout)
            for i in self.layers if (t := self.targets(i))
        })

    def config(self) -> dict[str, Any]:
        """The constructor's arguments (what :func:`save_predictor` stores)."""
        return {"layers": list(self.layers), "num_experts": self.num_experts,
                "top_k": self.top_k, "model_hidden": self.model_hidden,
                "lookahead": self.lookahead, "hidden_size": self.hidden_size,
                "dropout": self.dropout}

    def targets(self, layer: int, lookahead: int | None = None) -> list[int]:
        """The later MoE layers predicted from ``layer`` (at most the trained lookahead)."""
        ahead = self.lookahead if lookahead is None else min(lookahead, self.lookahead)
        return later_layers(self.layers, layer, ahead)

    def probabilities(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """(tokens, targets, E) use probabilities for all trained targets of ``layer``."""
        net: Any = self.nets[str(layer)]
        x = hidden.to(net.mean.device, torch.float32)
        return torch.sigmoid(net(x)).view(x.shape[0], -1, self.num_experts)

    def predict(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                lookahead: int) -> dict[int, torch.Tensor]:
        """Expected tokens per expert (E,) for each of the next ``lookahead`` MoE layers
        (float32, on ``hidden``'s device); empty for a layer it was not trained on.
        """
        targets = self.targets(layer, lookahead)
        if not targets or str(layer) not in self.nets:
            return {}
        self._ready(hidden.device)
        with torch.no_grad():
            sums = self.probabilities(layer, hidden.reshape(-1, self.model_hidden)).sum(0)
        return {t: sums[j] for j, t in enumerate(targets)}

    def _ready(self, device: torch.device) -> None:
        """Eval mode, and on ``device`` (moved once, the first time it differs)."""
        if self.training:
            self.eval()
        first: Any = next(iter(self.nets.values()))
        if first.mean.device != device:
            self.to(device)


def train_predictor(
    trace: RoutingTrace, *, lookahead: int = 2, hidden_size: int = 256, epochs: int = 40,
    batch_size: int = 256, dropout: float = 0.2, lr: float = 1e-3, patience: int = 3,
    holdout: float = 0.1, seed: int = 0, device: str = "cpu",
    routers: dict[int, torch.Tensor] | None = None,
) -> tuple[LearnedPredictor, PredictorMetrics]:
    """Train a :class:`LearnedPredictor` on ``trace``: the last ``holdout`` share of its tokens
    is held out for early stopping (after ``patience`` epochs without a better held-out loss,
    keeping the best epoch's weights) and for the returned metrics. Deterministic for a seed
    on the CPU; the global CPU RNG is left as it was.

    ``routers`` (MoE layer -> router weight (E, H)) adds the next-router baseline.

    Raises:
        ConfigError: the trace has fewer than 2 MoE layers or 2 tokens.
    """
    n = trace.num_tokens
    if len(trace.layers) < 2 or n < 2:
        msg = (f"the routing trace ({trace.model}) has {len(trace.layers)} MoE layers and {n} "
               "tokens; the learned predictor needs at least 2 of each: record more prompts, "
               "or use predictor='next_router'")
        raise ConfigError(msg)
    held = max(1, round(n * holdout))
    train, val = slice(0, n - held), slice(n - held, n)
    where = torch.device(device)
    with torch.random.fork_rng(devices=[where] if where.type == "cuda" else []):
        torch.manual_seed(seed)
        predictor = LearnedPredictor(
            trace.layers, num_experts=trace.num_experts, top_k=trace.top_k,
            model_hidden=int(trace.hidden[trace.layers[0]].shape[1]), lookahead=lookahead,
            hidden_size=hidden_size, dropout=dropout).to(device)
        data = _examples(predictor, trace, device)
        _standardize(predictor, data, train)
        ran = _fit(predictor, data, train, val, epochs=epochs, batch_size=batch_size, lr=lr,
                   patience=patience)
    metrics = evaluate_predictor(predictor, trace, rows=val, routers=routers,
                                 train_tokens=n - held, epochs=ran)
    return predictor, metrics


_Data = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _examples(predictor: LearnedPredictor, trace: RoutingTrace, device: str) -> _Data:
    """Per source layer: (hidden float32, multi-hot targets (N, targets * E))."""
    out: _Data = {}
    for key in predictor.nets:
        layer = int(key)
        hots = [_multi_hot(trace.routes[t], trace.num_experts) for t in predictor.targets(layer)]
        x = trace.hidden[layer].to(device, torch.float32)
        out[key] = (x, torch.cat(hots, dim=1).to(device))
    return out


def _multi_hot(routes: torch.Tensor, num_experts: int) -> torch.Tensor:
    hot = torch.zeros(routes.shape[0], num_experts)
    return hot.scatter_(1, routes.long().cpu(), 1.0)


def _standardize(predictor: LearnedPredictor, data: _Data, train: slice) -> None:
    for key, (x, _) in data.items():
        net: Any = predictor.nets[key]
        net.mean.copy_(x[train].mean(0))
        net.scale.copy_(1.0 / x[train].std(0).clamp_min(1e-4))


def _fit(predictor: LearnedPredictor, data: _Data, train: slice, val: slice, *,
         epochs: int, batch_size: int, lr: float, patience: int) -> int:
    """Adam on the summed BCE of all layers; early stopping on the held-out loss. Returns the
    epochs run.
    """
    optimizer = torch.optim.Adam(predictor.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    size = train.stop - train.start
    best, best_state, stale, ran = float("inf"), copy.deepcopy(predictor.state_dict()), 0, 0
    while ran < epochs:
        ran += 1
        predictor.train()
        for rows in torch.randperm(size).split(batch_size):
            loss = sum(loss_fn(predictor.nets[k](x[train][rows]), y[train][rows])
                       for k, (x, y) in data.items())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[union-attr]
            optimizer.step()
        score = _held_out_loss(predictor, data, val, loss_fn)
        if score < best - 1e-4:
            best, best_state, stale = score, copy.deepcopy(predictor.state_dict()), 0
        else:
            stale += 1
            if stale >= patience:
                break
    predictor.load_state_dict(best_state)
    predictor.eval()
    return ran


def _held_out_loss(predictor: LearnedPredictor, data: _Data, val: slice,
                   loss_fn: nn.Module) -> float:
    if val.stop <= val.start:
        return 0.0
    predictor.eval()
    with torch.no_grad():
        return float(sum(loss_fn(predictor.nets[k](x[val]), y[val]) for k, (x, y) in data.items()))


def evaluate_predictor(
    predictor: LearnedPredictor, trace: RoutingTrace, *, rows: slice | None = None,
    routers: dict[int, torch.Tensor] | None = None, train_tokens: int = 0, epochs: int = 0,
) -> PredictorMetrics:
    """Precision/recall@k of ``predictor`` on the tokens ``rows`` of ``trace`` (all by
    default), per lookahead distance, beside chance, the best fixed top-k and (given
    ``routers``) the next-router predictor.
    """
    rows = rows if rows is not None else slice(0, trace.num_tokens)
    k, num_experts = trace.top_k, trace.num_experts
    per: dict[int, list[list[float]]] = {}
    predictor.eval()
    for key in predictor.nets:
        layer = int(key)
        hidden = trace.hidden[layer][rows].float()
        with torch.no_grad():
            probs = predictor.probabilities(layer, hidden).cpu()
        for j, target in enumerate(predictor.targets(layer), start=1):
            truth = _multi_hot(trace.routes[target][rows], num_experts)
            router = None if routers is None else routers.get(target)
            per.setdefault(j, []).append(_scores(probs[:, j - 1], truth, k, hidden, router))
    distances = tuple(_mean_distance(j, rows_) for j, rows_ in sorted(per.items()))
    return PredictorMetrics(num_experts, k, predictor.lookahead, train_tokens,
                            rows.stop - rows.start, k / num_experts, distances, epochs)


def _scores(probs: torch.Tensor, truth: torch.Tensor, k: int, hidden: torch.Tensor,
            router: torch.Tensor | None) -> list[float]:
    """[precision, recall_2k, best_fixed, next_router or nan] for one (source, target)."""
    def hits(top: torch.Tensor) -> torch.Tensor:
        return truth.gather(1, top).sum(1)

    fixed = truth.sum(0).topk(k).indices.expand(truth.shape[0], k)
    wide = min(2 * k, truth.shape[1])
    nxt = float("nan")
    if router is not None:
        logits = hidden @ router.detach().to("cpu", torch.float32).T
        nxt = float(hits(logits.topk(k, dim=1).indices).mean()) / k
    return [float(hits(probs.topk(k, dim=1).indices).mean()) / k,
            float(hits(probs.topk(wide, dim=1).indices).mean()) / k,
            float(hits(fixed).mean()) / k, nxt]


def _mean_distance(distance: int, rows: list[list[float]]) -> DistanceMetrics:
    cols = list(zip(*rows, strict=True))
    mean = [sum(c) / len(c) for c in cols]
    nxt = None if any(v != v for v in cols[3]) else mean[3]  # nan: no router for some layer
    return DistanceMetrics(distance, mean[0], mean[0], mean[1], mean[2], nxt)


def save_predictor(predictor: LearnedPredictor, metrics: PredictorMetrics,
                   path: str | os.PathLike[str]) -> None:
    """Write the predictor (config, weights on the CPU, metrics) to ``path`` and its metrics,
    human readable, to the same name with ``.json``; creates the folder.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in predictor.state_dict().items()}
    torch.save({"format": FORMAT, "version": VERSION, "config": predictor.config(),
                "state_dict": state, "metrics": metrics.to_dict()}, target)
    text = json.dumps({"predictor": predictor.config(), "metrics": metrics.to_dict()}, indent=2)
    target.with_suffix(".json").write_text(text + "\n", encoding="utf-8")


def load_predictor(path: str | os.PathLike[str], *,
                   device: str = "cpu") -> tuple[LearnedPredictor, PredictorMetrics]:
    """Read what :func:`save_predictor` wrote, in eval mode on ``device``.

    Raises:
        ConfigError: the file is missing, unreadable, truncated or not a predictor.
    """
    what = "MoE expert predictor"
    data = load_checked(path, what=what, fmt=FORMAT, version=VERSION, fix=_FIX)
    try:
        config = dict(data["config"])
        layers = config.pop("layers")
        predictor = LearnedPredictor(layers, **config)
        predictor.load_state_dict(data["state_dict"])
        metrics = PredictorMetrics.from_dict(data["metrics"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise bad_file(path, what, f"malformed content ({exc})", _FIX) from exc
    return predictor.to(device).eval(), metrics
