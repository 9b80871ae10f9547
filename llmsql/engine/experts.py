"""Seam: replace a mixture-of-experts model's expert modules (expert offload plugs in here).

transformers v5 keeps each MoE layer's experts as one module (Mixtral, Qwen2/3-MoE, OLMoE,
DeepSeek-V3: ``model.layers[i].mlp.experts``, a ``*Experts`` module with fused 3-D
parameters ``gate_up_proj[E, 2I, H]`` and ``down_proj[E, H, I]``). The router stays where it
is and calls the experts as ``experts(hidden_states, top_k_index, top_k_weights)``:
``hidden_states`` is (tokens, H), ``top_k_index`` and ``top_k_weights`` are (tokens, k), the
result is (tokens, H). A replacement takes the same call, so an offloading module (weights in
host memory, a cache of expert slots on the GPU, prefetching) swaps in without touching the
rest of the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmsql.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import nn

def find_experts(model: nn.Module, /) -> list[tuple[str, nn.Module]]:
    """The model's expert modules (every submodule whose attribute name is ``experts``), as
    (qualified name, module) in module order; empty for a dense model.
    """
    return [(name, module) for name, module in model.named_modules()
            if name.rsplit(".", 1)[-1] == "experts"]


def replace_experts(
    model: nn.Module, factory: Callable[[str, nn.Module], nn.Module], /
) -> list[str]:
    """Replace every expert module of ``model`` by ``factory(name, module)``, in place.

    ``factory`` builds the replacement of the expert module called ``name`` (its qualified
    name, e.g. ``model.layers.3.mlp.experts``) from the module itself, which it may wrap,
    copy or move.

    Returns:
        The qualified names of the replaced modules, in module order.

    Raises:
        ConfigError: ``model`` has no expert modules (a dense model).
    """
    found = find_experts(model)
    if not found:
        kind = type(model).__name__
        msg = (f"{kind} has no mixture-of-experts modules (no submodule named 'experts'); "
               "replace_experts needs an MoE model such as Mixtral, Qwen2-MoE or OLMoE")
        raise ConfigError(msg)
    for name, module in found:
        model.set_submodule(name, factory(name, module))
    return [name for name, _ in found]
