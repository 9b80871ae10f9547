"""Attach LoRA adapters to a causal LM so that only the adapters train.

Two implementations give the same adapters (``W x + (alpha / rank) * B(A(dropout(x)))``,
``A`` Kaiming-uniform as PEFT draws it, ``B`` zero, so a fresh adapter changes nothing):

- ``peft``: PEFT's ``inject_adapter_in_model`` (the modules and the file format the issue
  asks for; the model keeps its class and attributes, unlike ``get_peft_model``);
- ``engine``: :func:`llmsql.engine.adapters.add_adapters` with LoRA modules, for
  environments without PEFT.

``auto`` picks ``peft`` where it is installed, else ``engine``.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import torch
from torch import nn

from llmsql.engine.adapters import LoRA, adapter_parameters, add_adapters
from llmsql.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

IMPLS: tuple[str, ...] = ("auto", "peft", "engine")
"""The values of ``attach_lora(impl=...)``."""


def lora_impl(impl: str, /) -> str:
    """The concrete implementation ``impl`` names (``auto``: ``peft`` if installed)."""
    if impl not in IMPLS:
        msg = f"LoRA implementation {impl!r} is unknown; pass one of {', '.join(IMPLS)}"
        raise ConfigError(msg)
    if impl == "auto":
        return "peft" if importlib.util.find_spec("peft") is not None else "engine"
    if impl == "peft" and importlib.util.find_spec("peft") is None:
        msg = ("LoRA implementation 'peft' needs the peft package, which is not installed; "
               "pip install peft, or pass impl='engine'")
        raise ConfigError(msg)
    return impl


def attach_lora(
    model: nn.Module,
    /,
    *,
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    dropout: float = 0.0,
    seed: int = 0,
    impl: str = "auto",
) -> list[nn.Parameter]:
    """Add LoRA adapters to the linear layers of ``model`` named in ``target_modules`` (e.g.
    ``("q_proj", "v_proj")``), freeze everything else, and return the adapter parameters
    (what an optimizer updates), in module order.

    The same ``seed`` gives the same adapter weights; the global torch RNG is left as it was.

    Raises:
        ConfigError: ``rank`` < 1, ``alpha`` <= 0, ``dropout`` outside [0, 1), no target
            module, no linear layer with such a name, or an unknown ``impl``.
    """
    _check(rank, alpha, dropout, target_modules)
    chosen = lora_impl(impl)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if chosen == "peft":
            _attach_peft(model, rank, alpha, list(target_modules), dropout)
        else:
            add_adapters(model, tuple(target_modules), _engine_factory(rank, alpha, dropout))
    for p in model.parameters():
        p.requires_grad_(False)
    params = _lora_parameters(model, chosen)
    for p in params:
        p.requires_grad_(True)
    return params


def _check(rank: int, alpha: float, dropout: float, targets: Sequence[str]) -> None:
    problems = [(rank < 1, f"rank = {rank} is below 1; pass a rank >= 1 such as 16"),
                (alpha <= 0, f"alpha = {alpha} is not positive; pass alpha > 0 such as 32"),
                (not 0 <= dropout < 1, f"dropout = {dropout} is outside [0, 1)"),
                (not targets, "target_modules is empty; name linear layers such as q_proj")]
    for bad, problem in problems:
        if bad:
            msg = f"attach_lora: {problem}"
            raise ConfigError(msg)


def _attach_peft(model: nn.Module, rank: int, alpha: float, targets: list[str],
                 dropout: float) -> None:
    from peft import LoraConfig, inject_adapter_in_model  # type: ignore[import-not-found, unused-ignore]

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                        lora_dropout=dropout, bias="none")
    try:
        inject_adapter_in_model(config, model)
    except ValueError as exc:  # PEFT: "Target modules ... not found in the base model"
        msg = (f"no linear layer of {type(model).__name__} is named {', '.join(targets)} "
               f"({exc}); pass attribute names of its nn.Linear modules, such as q_proj")
        raise ConfigError(msg) from exc


def _engine_factory(rank: int, alpha: float,
                    dropout: float) -> Callable[[str, nn.Linear], nn.Module]:
    def make(name: str, linear: nn.Linear) -> nn.Module:
        del name
        lora = LoRA(linear.in_features, linear.out_features, rank=rank, alpha=alpha)
        lora = lora.to(device=linear.weight.device, dtype=linear.weight.dtype)
        return nn.Sequential(nn.Dropout(dropout), lora) if dropout else lora

    return make


def _lora_parameters(model: nn.Module, impl: str) -> list[nn.Parameter]:
    if impl == "engine":
        return adapter_parameters(model)
    return [p for name, p in model.named_parameters() if "lora_" in name]
