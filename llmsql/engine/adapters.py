"""Seam: add adapters to a model's linear layers (LoRA training and serving plug in here).

:func:`add_adapters` wraps chosen ``nn.Linear`` modules (by attribute name, e.g. ``q_proj``)
in an :class:`AdaptedLinear`: ``base(x) + adapter(x)``. The adapter is whatever a factory
builds; :func:`lora` gives LoRA adapters (``(alpha / rank) * B(A(x))``, ``B`` zero at the
start, so a fresh adapter leaves every output unchanged). The base weights are left as they
are (freeze them before training: only :func:`adapter_parameters` need gradients).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from llmsql.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence


class AdaptedLinear(nn.Module):
    """A linear layer plus an adapter: ``base(x) + adapter(x)``.

    ``weight``, ``bias``, ``in_features`` and ``out_features`` are the base layer's, for
    code that reads them from the module it expects to be a linear layer.
    """

    def __init__(self, base: nn.Linear, adapter: nn.Module) -> None:
        """Wrap ``base`` (kept as it is) with ``adapter``."""
        super().__init__()
        self.base = base
        self.adapter = adapter

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias."""
        return self.base.bias

    @property
    def in_features(self) -> int:
        """The base layer's input width."""
        return self.base.in_features

    @property
    def out_features(self) -> int:
        """The base layer's output width."""
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + adapter(x)``."""
        out: torch.Tensor = self.base(x) + self.adapter(x)
        return out


class LoRA(nn.Module):
    """A low-rank adapter: ``x -> (alpha / rank) * up(down(x))``.

    ``down`` (A) starts as PEFT's (Kaiming-uniform), ``up`` (B) at zero, so a fresh adapter
    adds nothing.
    """

    def __init__(self, in_features: int, out_features: int, *, rank: int = 8,
                 alpha: float = 16.0) -> None:
        """A rank-``rank`` adapter from ``in_features`` to ``out_features``."""
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution for ``x``."""
        out: torch.Tensor = self.up(self.down(x)) * self.scale
        return out


def lora(*, rank: int = 8, alpha: float = 16.0) -> Callable[[str, nn.Linear], nn.Module]:
    """A factory for :func:`add_adapters` that builds a :class:`LoRA` per layer, on the
    layer's device and in its dtype.
    """

    def make(name: str, linear: nn.Linear) -> nn.Module:
        del name
        adapter = LoRA(linear.in_features, linear.out_features, rank=rank, alpha=alpha)
        return adapter.to(device=linear.weight.device, dtype=linear.weight.dtype)

    return make


def add_adapters(
    model: nn.Module,
    targets: Sequence[str],
    factory: Callable[[str, nn.Linear], nn.Module],
    /,
) -> list[str]:
    """Wrap every ``nn.Linear`` of ``model`` whose attribute name is in ``targets`` (e.g.
    ``("q_proj", "v_proj")``) in an :class:`AdaptedLinear` with ``factory(name, linear)``.

    Returns:
        The qualified names of the wrapped layers, in module order.

    Raises:
        ConfigError: no linear layer of ``model`` has one of those names.
    """
    wanted = set(targets)
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in wanted]
    if not found:
        msg = (f"no linear layer of {type(model).__name__} is named {', '.join(sorted(wanted))}; "
               "pass attribute names of its nn.Linear modules, such as q_proj or v_proj")
        raise ConfigError(msg)
    for name, module in found:
        model.set_submodule(name, AdaptedLinear(module, factory(name, module)))
    return [name for name, _ in found]


def adapter_parameters(model: nn.Module, /) -> list[nn.Parameter]:
    """The parameters of every adapter in ``model`` (what training updates)."""
    return [p for m in model.modules() if isinstance(m, AdaptedLinear)
            for p in m.adapter.parameters()]
