"""Seam: run a model piece by piece (a layer split across workers plugs in here).

A decoder-only model is ``head(run_layers(embed(ids), 0, n))``: :func:`embed` turns token ids
into hidden states, :func:`run_layers` runs decoder layers ``start..stop-1`` on given hidden
states, and :func:`head` applies the final norm and the LM head. Cutting at any ``k`` gives
two halves that can run on different workers (only the (rows, tokens, hidden) boundary
tensor crosses); each half keeps the KV cache of its own layers when given one.

Works with transformers' Llama-style decoders (``model.model`` with ``embed_tokens``,
``layers``, ``norm`` and ``rotary_emb``): Llama, Mistral, Qwen2/3, Mixtral, Qwen2-MoE, OLMoE,
SmolLM2, and models with sliding-window layers (``config.layer_types``).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch

from llmsql.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn
    from transformers import Cache, PreTrainedModel


def decoder(model: PreTrainedModel, /) -> Any:
    """The model's decoder stack (``model.model`` for a causal LM), an ``nn.Module`` with
    ``embed_tokens``, ``layers``, ``norm`` and ``rotary_emb``.
    """
    base: nn.Module = model.base_model
    for part in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(base, part):
            msg = (f"{type(model).__name__} has no {part} in its decoder; running a range of "
                   "layers needs a Llama-style decoder (Llama, Mistral, Qwen, Mixtral, OLMoE)")
            raise ConfigError(msg)
    return base


def num_layers(model: PreTrainedModel, /) -> int:
    """The number of decoder layers."""
    return len(decoder(model).layers)


def embed(model: PreTrainedModel, ids: torch.Tensor, /) -> torch.Tensor:
    """The input hidden states of token ids (rows, tokens) -> (rows, tokens, hidden)."""
    hidden: torch.Tensor = decoder(model).embed_tokens(ids)
    return hidden


def head(model: PreTrainedModel, hidden: torch.Tensor, /) -> torch.Tensor:
    """The logits of the last layer's hidden states: final norm, then the LM head."""
    output = model.get_output_embeddings()  # type: ignore[no-untyped-call]
    logits: torch.Tensor = output(decoder(model).norm(hidden))
    return logits


def run_layers(
    model: PreTrainedModel,
    hidden: torch.Tensor,
    start: int,
    stop: int,
    /,
    *,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    cache: Cache | None = None,
) -> torch.Tensor:
    """Run decoder layers ``start..stop-1`` on ``hidden`` (rows, tokens, hidden).

    Args:
        model: The causal LM.
        hidden: Hidden states entering layer ``start``.
        start: First layer to run.
        stop: One past the last layer to run (``start == stop`` returns ``hidden``).
        position_ids: (rows, tokens) positions; default: after what ``cache`` holds for
            layer ``start``, else from 0.
        attention_mask: (rows, cached + tokens) 2-D mask, 1 for a real token (padding); None:
            no padding.
        cache: A KV cache for these layers (e.g. ``DynamicCache(config=model.config)``),
            read and extended in place; None: no cache.

    Returns:
        The hidden states leaving layer ``stop - 1``.

    Raises:
        ConfigError: the range is not within the model's layers.
    """
    base = decoder(model)
    count = len(base.layers)
    if not 0 <= start <= stop <= count:
        msg = f"layers {start}..{stop} are not a range of the model's {count} layers (0..{count})"
        raise ConfigError(msg)
    if position_ids is None:
        past = cache.get_seq_length(start) if cache is not None and start < count else 0
        position_ids = (torch.arange(hidden.shape[1], device=hidden.device) + past)[None]
    types = layer_types(model.config, count)
    masks = layer_masks(model, hidden, attention_mask, cache, position_ids, types[start:stop],
                        start)
    rotary = base.rotary_emb(hidden, position_ids)
    for i in range(start, stop):
        hidden = base.layers[i](
            hidden, attention_mask=masks[types[i]], position_embeddings=rotary,
            position_ids=position_ids, past_key_values=cache, use_cache=cache is not None,
        )
    return hidden


def layer_types(config: Any, count: int) -> list[str]:
    """Each decoder layer's attention type (``config.layer_types``, else all full)."""
    types = getattr(config, "layer_types", None)
    return list(types) if types else ["full_attention"] * count


def layer_masks(
    model: PreTrainedModel,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
    position_ids: torch.Tensor,
    types: list[str],
    start: int,
) -> dict[str, Any]:
    """The 4-D mask of each attention type among ``types``, sized against the cache of the
    first layer of that type in the range (a split's other layers may hold nothing).
    """
    from transformers.masking_utils import (
        create_causal_mask,
        create_sliding_window_causal_mask,
    )

    makers = {"full_attention": create_causal_mask,
              "sliding_attention": create_sliding_window_causal_mask}
    masks: dict[str, Any] = {}
    for kind in dict.fromkeys(types):
        make = makers.get(kind)
        if make is None:
            msg = (f"layers of type {kind!r} are not supported by run_layers (only "
                   "full_attention and sliding_attention); run the whole model instead")
            raise ConfigError(msg)
        kwargs: dict[str, Any] = {
            "config": model.config, "inputs_embeds": hidden, "attention_mask": attention_mask,
            "past_key_values": cache, "position_ids": position_ids,
        }
        if "layer_idx" in inspect.signature(make).parameters:  # where transformers has it
            kwargs["layer_idx"] = start + types.index(kind)
        masks[kind] = make(**kwargs)
    return masks
