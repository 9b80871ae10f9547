"""Installing expert offload on a model: check it is a supported MoE, move its experts to host
memory, pick the predictor, and swap every experts module for an
:class:`~llmsql.engine.moe.offload.OffloadedExperts` (the mechanism is
:mod:`~llmsql.engine.moe.offload`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llmsql.engine.experts import find_experts
from llmsql.engine.moe.offload import ExpertOffload, OffloadedExperts
from llmsql.engine.moe.predictors import NextRouter, NoPredictor, Predictor, routers_of
from llmsql.engine.moe.trace import moe_layer_index
from llmsql.errors import ConfigError
from llmsql.moe.options import profile_path
from llmsql.moe.plan import NEXT_ROUTER_PRIOR, Hardware, MoEShape

if TYPE_CHECKING:
    from pathlib import Path

    from llmsql.moe.options import MoEOptions


def check_moe_model(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """The model's MoE layers as (layer, name, experts module), checked for the fused layout.

    Raises:
        ConfigError: a dense model, or experts not in transformers 5's fused layout
            (``gate_up_proj[E, 2I, H]``, ``down_proj[E, H, I]``, no bias, concatenated).
    """
    kind = type(model).__name__
    found = find_experts(model)
    if not found:
        msg = (f"{kind} is a dense model (no mixture-of-experts layers): expert offload "
               "options (expert_cache, moe_plan, predictor, lookahead) apply to MoE models "
               "such as Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE; drop them for this model")
        raise ConfigError(msg)
    out = []
    for name, module in found:
        gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        fused = (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)
                 and gate_up.dim() == 3 and down.dim() == 3
                 and not getattr(module, "has_bias", False)
                 and not getattr(module, "is_transposed", False)
                 and getattr(module, "is_concatenated", True))
        if not fused:
            msg = (f"{kind}'s {name} ({type(module).__name__}) is not in transformers 5's "
                   "fused experts layout (3-D gate_up_proj[E, 2I, H] and down_proj[E, H, I], "
                   "no bias): expert offload supports Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE; "
                   "upgrade transformers (>= 5) or drop the expert offload options")
            raise ConfigError(msg)
        out.append((moe_layer_index(name), name, module))
    return out



def _host_copy(t: torch.Tensor, pin: bool) -> torch.Tensor:
    if t.device.type == "meta":
        msg = "experts on the meta device: pass their host tensors (host=)"
        raise ConfigError(msg)
    host = t.detach().to("cpu")
    return host.pin_memory() if pin else host.contiguous()


def offload_experts(model: nn.Module, options: MoEOptions, *, device: str | torch.device,
                    model_dir: str | Path | None = None, predictor: Predictor | None = None,
                    host: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
                    hardware: Hardware | None = None) -> ExpertOffload:
    """Keep ``model``'s experts in host memory and serve them from a GPU slot cache.

    ``model`` may be anywhere (load it on the CPU when its experts don't fit the GPU): its
    experts are copied to (pinned, on a GPU) host memory, or taken from ``host`` (layer ->
    (gate_up, down) host tensors, for models built on the meta device), every experts module
    is replaced by an :class:`OffloadedExperts`, and the rest of the model moves to
    ``device``. The predictor is ``predictor`` if given, else by ``options.predictor``:
    ``auto`` takes the learned profile (``options.profile``, or the one stored under
    ``model_dir``) when there is one, else ``next_router``.

    Raises:
        ConfigError: dense or non-fused model, a cache below one layer's top-k, an unreadable
            profile.
    """
    dev = torch.device(device)
    found = check_moe_model(model)
    config = getattr(model, "config", None)
    first = found[0][2]
    shape = dataclasses.replace(
        MoEShape.from_config(config), dtype_bytes=first.gate_up_proj.element_size())
    shape = dataclasses.replace(shape, moe_layers=len(found))
    layers = tuple(layer for layer, _, _ in found)
    pin = dev.type == "cuda"
    slabs = host or {layer: (_host_copy(m.gate_up_proj, pin), _host_copy(m.down_proj, pin))
                     for layer, _, m in found}
    act = first.act_fn
    for _, name, _ in found:  # free the originals before the rest moves
        model.set_submodule(name, nn.Identity())
    model.to(dev)
    pred, accuracy = (predictor, NEXT_ROUTER_PRIOR) if predictor is not None else _predictor(
        model, options, layers, shape, model_dir, dev)
    runtime = ExpertOffload(shape, options, layers=layers, host=slabs, device=dev,
                            predictor=pred, act=act, hardware=hardware, accuracy=accuracy)
    for layer, name, _ in found:
        model.set_submodule(name, OffloadedExperts(runtime, layer))
    return runtime


def _predictor(model: nn.Module, options: MoEOptions, layers: tuple[int, ...],
               shape: MoEShape, model_dir: str | Path | None, dev: torch.device
               ) -> tuple[Predictor, float]:
    choice = options.predictor
    if options.plan == "lru" or choice == "none":
        return NoPredictor(), 0.0
    profile = profile_path(options, model_dir)
    if choice == "learned" or (choice == "auto" and profile is not None and profile.exists()):
        from llmsql.engine.moe.learned import load_predictor

        if profile is None:
            msg = ("predictor='learned' needs a routing profile: run `llmsql moe-profile "
                   "--model <folder> --sql ...` first, or set moe_profile to its file")
            raise ConfigError(msg)
        learned, metrics = load_predictor(profile, device=str(dev))
        return learned, _profile_accuracy(metrics)
    return NextRouter(routers_of(model, layers), shape.top_k), NEXT_ROUTER_PRIOR


def _profile_accuracy(metrics: Any) -> float:
    """The stored predictor's held-out precision one layer ahead (the prior if it has none)."""
    distances = getattr(metrics, "distances", ())
    return float(distances[0].precision) if distances else NEXT_ROUTER_PRIOR
