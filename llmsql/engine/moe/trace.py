"""Routing traces: what each MoE layer's router saw and chose, recorded on a model's own prompts.

A :class:`RoutingTrace` holds, for every MoE layer ``i`` (model layer index of
``model.layers.<i>.mlp.experts``), the hidden states that layer's experts module received (the
router's input, post-attention norm) and the experts the router picked, for the same ``N``
tokens in the same order in every layer. It is what the learned predictor trains on
(:mod:`llmsql.engine.moe.learned`) and what an oracle replays.

:func:`record_routing` runs prefill forwards with each experts module wrapped (through the
:func:`llmsql.engine.experts.replace_experts` seam) by a recorder that calls the original, so
it works on the stock fused experts and on any replacement taking the same call (an offloaded
cache); the originals are put back afterwards, also when the forward fails.

>>> moe_layer_index("model.layers.12.mlp.experts")
12
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llmsql.engine.experts import find_experts, replace_experts
from llmsql.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

FORMAT = "llmsql-routing-trace"
VERSION = 1
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    """Routing of ``N`` tokens through every MoE layer of a model.

    Attributes:
        layers: model layer indices of the MoE layers, ascending.
        num_experts: experts per MoE layer (E).
        top_k: experts each token is routed to (k).
        hidden: per layer, (N, H) float16 CPU: the input the layer's experts received.
        routes: per layer, (N, k) integer CPU: the experts the router chose (top_k_index).
        model: a description of the model (class, config summary).
        tokens_seen: tokens run through the model (before subsampling to ``N``).
        prompts: prompts (rows) run.
        token_ids: (N,) integer CPU: each recorded token's id (None in traces written before
            ids were recorded); the routing table of the ``expert_order`` rule counts them
            (:mod:`llmsql.engine.moe.token_table`).
    """

    layers: tuple[int, ...]
    num_experts: int
    top_k: int
    hidden: dict[int, torch.Tensor]
    routes: dict[int, torch.Tensor]
    model: str = ""
    tokens_seen: int = 0
    prompts: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    token_ids: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """N: tokens recorded (the same in every layer)."""
        return int(self.routes[self.layers[0]].shape[0]) if self.layers else 0

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the trace to one file (torch.save of plain tensors and dicts)."""
        torch.save({
            "format": FORMAT, "version": VERSION, "layers": list(self.layers),
            "num_experts": self.num_experts, "top_k": self.top_k, "model": self.model,
            "tokens_seen": self.tokens_seen, "prompts": self.prompts, "meta": dict(self.meta),
            "hidden": {str(i): t for i, t in self.hidden.items()},
            "routes": {str(i): t for i, t in self.routes.items()},
            **({} if self.token_ids is None else {"token_ids": self.token_ids}),
        }, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RoutingTrace:
        """Read a trace :meth:`save` wrote.

        Raises:
            ConfigError: the file is missing, unreadable, truncated or not a routing trace.
        """
        what = "routing trace"
        data = load_checked(path, what=what, fmt=FORMAT, version=VERSION, fix=_RECORD_AGAIN)
        try:
            trace = _from_dict(data)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise bad_file(path, what, f"malformed content ({exc})", _RECORD_AGAIN) from exc
        return trace


def moe_layer_index(name: str) -> int:
    """The model layer index in an experts module's qualified name (``...layers.<i>....``).

    Raises:
        ConfigError: the name holds no ``layers.<i>.`` part.
    """
    match = _LAYER.search(name)
    if match is None:
        msg = (f"cannot tell the layer of the experts module {name!r} (no 'layers.<i>.' in its "
               "name); MoE offload supports models whose decoder layers are 'model.layers'")
        raise ConfigError(msg)
    return int(match.group(1))


def moe_layers(model: nn.Module) -> list[tuple[int, str]]:
    """(layer index, qualified name) of every experts module of ``model``, in module order
    (empty for a dense model).
    """
    return [(moe_layer_index(name), name) for name, _ in find_experts(model)]


def record_routing(
    model: nn.Module, batches: Iterable[torch.Tensor | list[list[int]]], *,
    max_tokens: int = 200_000, seed: int = 0,
) -> RoutingTrace:
    """Run prefill forwards (no grad, no KV cache, eval mode) on ``batches`` of token ids and
    record every MoE layer's experts input and routing.

    Args:
        model: a transformers causal LM with fused experts (``experts(hidden_states,
            top_k_index, top_k_weights)``), stock or replaced.
        batches: each a (B, S) or (S,) tensor of ids (every position recorded), or a list of
            prompts (lists of ids, any lengths: right-padded, padded positions not recorded).
        max_tokens: keep a uniform sample of this many tokens (the same positions in every
            layer) when more are run; ``seed`` draws it.

    Raises:
        ConfigError: the model has no experts modules, or no token was recorded.
    """
    found = moe_layers(model)
    if not found:
        msg = (f"{type(model).__name__} has no mixture-of-experts layers (no 'experts' module); "
               "record_routing needs an MoE model such as Mixtral, Qwen2-MoE or OLMoE")
        raise ConfigError(msg)
    sink = _Sink([layer for layer, _ in found], max_tokens, seed)
    with _recording(model, found, sink):
        device = input_device(model)
        for batch in batches:
            ids, mask = _as_batch(batch)
            with torch.no_grad():
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            sink.commit(mask.reshape(-1).bool(), prompts=int(ids.shape[0]),
                        ids=ids.reshape(-1))
    return sink.trace(_describe(model), _num_experts(model, found), _top_k(sink))


def input_device(model: nn.Module) -> torch.device:
    """The device of the model's input embeddings (where token ids go)."""
    embeddings: Any = model.get_input_embeddings()  # type: ignore[operator]
    device: torch.device = embeddings.weight.device
    return device


class _Recorder(nn.Module):
    """Calls the wrapped experts module and hands its inputs to the sink."""

    def __init__(self, inner: nn.Module, layer: int, sink: _Sink) -> None:
        super().__init__()
        self.inner = inner
        self.layer = layer
        self.sink = sink

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        self.sink.see(self.layer, hidden_states.detach(), top_k_index.detach())
        out: torch.Tensor = self.inner(hidden_states, top_k_index, top_k_weights)
        return out


class _Sink:
    """Collects one forward's calls, then keeps a uniform sample of tokens: each token gets a
    random key and the ``max_tokens`` smallest keys stay (the same tokens in every layer).
    """

    def __init__(self, layers: list[int], max_tokens: int, seed: int) -> None:
        self.layers, self.max_tokens = layers, max_tokens
        self.generator = torch.Generator().manual_seed(seed)
        self.pending: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.hidden: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
        self.routes: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
        self.keys: list[torch.Tensor] = []
        self.ids: list[torch.Tensor] = []
        self.seen = self.prompts = 0

    def see(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor) -> None:
        self.pending.setdefault(layer, []).append((hidden, top_k_index))

    def commit(self, keep: torch.Tensor, *, prompts: int, ids: torch.Tensor) -> None:
        calls, self.pending = self.pending, {}
        n = int(keep.sum())
        for layer in self.layers:
            hidden = torch.cat([h for h, _ in calls.get(layer, [])] or [torch.empty(0)])
            routes = torch.cat([r for _, r in calls.get(layer, [])] or [torch.empty(0)])
            if hidden.shape[0] != keep.numel():
                msg = (f"layer {layer}'s experts saw {hidden.shape[0]} tokens in a forward of "
                       f"{keep.numel()} positions; record_routing needs one experts call per "
                       "MoE layer over all positions (a prefill forward)")
                raise ConfigError(msg)
            self.hidden[layer].append(hidden[keep.to(hidden.device)].to("cpu", torch.float16))
            self.routes[layer].append(routes[keep.to(routes.device)].to("cpu", torch.int32))
        self.ids.append(ids[keep.to(ids.device)].to("cpu", torch.int32))
        self.keys.append(torch.rand(n, generator=self.generator))
        self.seen, self.prompts = self.seen + n, self.prompts + prompts
        if sum(k.numel() for k in self.keys) > 2 * self.max_tokens:
            self._prune()

    def _prune(self) -> None:
        keys = torch.cat(self.keys)
        kept = torch.sort(torch.topk(keys, min(self.max_tokens, keys.numel()),
                                     largest=False).indices).values
        self.keys = [keys[kept]]
        self.ids = [torch.cat(self.ids)[kept]]
        for layer in self.layers:
            self.hidden[layer] = [torch.cat(self.hidden[layer])[kept]]
            self.routes[layer] = [torch.cat(self.routes[layer])[kept]]

    def trace(self, model: str, num_experts: int, top_k: int) -> RoutingTrace:
        if self.seen == 0:
            msg = "record_routing ran no token (empty batches); pass prompts with tokens"
            raise ConfigError(msg)
        self._prune()
        routes = {i: self.routes[i][0] for i in self.layers}
        return RoutingTrace(tuple(sorted(self.layers)), num_experts, top_k,
                            {i: self.hidden[i][0] for i in self.layers}, routes, model,
                            self.seen, self.prompts, token_ids=self.ids[0])


@contextmanager
def _recording(model: nn.Module, found: list[tuple[int, str]], sink: _Sink) -> Iterator[None]:
    originals = {name: model.get_submodule(name) for _, name in found}
    layer_of = {name: layer for layer, name in found}
    was_training = model.training
    model.eval()
    try:
        replace_experts(model, lambda name, module: _Recorder(module, layer_of[name], sink))
        yield
    finally:
        for name, module in originals.items():
            model.set_submodule(name, module)
        model.train(was_training)


def _as_batch(batch: torch.Tensor | list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of a batch; prompts of different lengths are right-padded."""
    if isinstance(batch, torch.Tensor):
        ids = batch if batch.dim() == 2 else batch.reshape(1, -1)
        return ids.long(), torch.ones_like(ids, dtype=torch.long)
    width = max((len(p) for p in batch), default=0)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(batch):
        ids[row, :len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, :len(prompt)] = 1
    return ids, mask


def _num_experts(model: nn.Module, found: list[tuple[int, str]]) -> int:
    config = getattr(model, "config", None)
    for attr in ("num_local_experts", "num_experts", "n_routed_experts"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    module = model.get_submodule(found[0][1])
    return int(getattr(module, "num_experts", 0))


def _top_k(sink: _Sink) -> int:
    first = sink.routes[sink.layers[0]]
    return int(first[0].shape[1]) if first and first[0].dim() == 2 else 0


def _describe(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    parts = [type(model).__name__]
    for attr in ("name_or_path", "_name_or_path"):
        value = getattr(config, attr, "")
        if value:
            parts.append(str(value))
            break
    for attr in ("num_hidden_layers", "hidden_size"):
        if hasattr(config, attr):
            parts.append(f"{attr}={getattr(config, attr)}")
    return " ".join(parts)


_RECORD_AGAIN = ("record it again with llmsql.engine.moe.trace.record_routing "
                 "(or `llmsql moe-profile`)")


def load_checked(path: str | os.PathLike[str], *, what: str, fmt: str, version: int,
                 fix: str) -> dict[str, Any]:
    """The dict a ``torch.save`` wrote to ``path`` with header ``format == fmt`` and
    ``version``, read with ``weights_only`` (plain tensors and containers only).

    Raises:
        ConfigError: missing, unreadable or truncated file, or another format or version; the
            message names the file, ``what`` it should be and ``fix``.
    """
    if not os.path.isfile(path):
        raise bad_file(path, what, "no such file", fix)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        raise bad_file(path, what, f"unreadable ({type(exc).__name__}: {exc})", fix) from exc
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise bad_file(path, what, f"not a {what} file (no '{fmt}' header)", fix)
    if data.get("version") != version:
        raise bad_file(path, what, f"format version {data.get('version')!r}, not {version}", fix)
    return data


def bad_file(path: str | os.PathLike[str], what: str, why: str, fix: str) -> ConfigError:
    """The ConfigError for an unusable ``what`` file: what happened, where, how to fix."""
    return ConfigError(f"cannot load the {what} {os.fspath(path)!r}: {why}; {fix}")


def _from_dict(data: dict[str, Any]) -> RoutingTrace:
    layers = tuple(int(i) for i in data["layers"])
    hidden = {i: data["hidden"][str(i)] for i in layers}
    routes = {i: data["routes"][str(i)] for i in layers}
    k = int(data["top_k"])
    counts = {int(t.shape[0]) for t in (*hidden.values(), *routes.values())}
    if len(counts) > 1 or any(t.dim() != 2 or t.shape[1] != k for t in routes.values()):
        msg = f"layers disagree on the tokens or top_k (token counts {counts})"
        raise ValueError(msg)
    if list(layers) != sorted(set(layers)) or not layers:
        msg = f"layers {list(layers)} are not ascending"
        raise ValueError(msg)
    ids = data.get("token_ids")  # absent in traces written before ids were recorded
    if ids is not None and (ids.dim() != 1 or int(ids.shape[0]) not in counts):
        msg = f"token_ids of shape {tuple(ids.shape)} do not match {counts} tokens"
        raise ValueError(msg)
    return RoutingTrace(layers, int(data["num_experts"]), k, hidden, routes,
                        str(data["model"]), int(data["tokens_seen"]), int(data["prompts"]),
                        dict(data.get("meta", {})), ids)
