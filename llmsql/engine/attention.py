"""The attention the engine registers with transformers: SDPA, with a copy-free decode step.

Every model the engine loads or builds uses :data:`ATTENTION`: transformers' SDPA attention,
except one-token decode steps of grouped-query models, which :func:`decode_attention`
computes without copying the KV heads.
"""

from __future__ import annotations

from typing import Any

import torch

ATTENTION = "llmsql_sdpa"
"""The attention implementation's name (``attn_implementation=ATTENTION``)."""


def attention_implementation() -> str:
    """Register :data:`ATTENTION` with transformers (once) and return its name."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS:

        def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                      **kwargs: Any) -> tuple[Any, None]:
            groups = getattr(module, "num_key_value_groups", 1)
            if query.shape[2] == 1 and groups > 1 and not kwargs.get("dropout"):
                return decode_attention(query, key, value, attention_mask,
                                        kwargs.get("scaling")), None
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(ATTENTION, attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    return ATTENTION


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor:
    """Attention of one new token per row over its KV, grouped-query heads kept grouped.

    transformers' SDPA path copies every key and value head ``groups`` times per layer and
    step when a mask is given (``repeat_kv``), and the CPU flash kernel is slow for a single
    query: in a profile of a 16-row decode step at 766 cached tokens, those two took 62% of
    the step. Here the query heads are viewed as (kv heads, groups) and multiplied with the
    cache as it is. Returns (rows, 1, heads, head dim), as transformers expects.
    """
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2))
    scores = scores * (scaling if scaling is not None else dim**-0.5)
    if mask is not None:
        last = mask[:, :, -1:, :]  # (rows, 1, 1, keys)
        if last.dtype == torch.bool:
            scores = scores.masked_fill(~last, float("-inf"))
        else:
            scores = scores + last
    probs = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # (rows, kv heads, groups, dim)
    return out.reshape(rows, heads, 1, dim).transpose(1, 2).contiguous()
