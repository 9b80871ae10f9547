"""A tiny mixture-of-experts LM trained in seconds on real text, so routing is learned, not random.

Random-weight MoE models route nearly uniformly, which says nothing about how predictable
routing is. The routing-predictor test and the GPU benchmark therefore train a small OLMoE
(or Mixtral) shape for a few hundred steps on text from ``../shared/datasets`` and record its
routing on held-out text (:mod:`llmsql.engine.moe.trace`).

Text is tokenized byte-level by default (:data:`BYTE_VOCAB_SIZE` ids: the 256 UTF-8 bytes plus
a separator), which keeps the LM head tiny; a Hugging Face tokenizer may be passed instead.

>>> text_token_ids(["hé"])
[[104, 195, 169]]
>>> tiny_moe_config(BYTE_VOCAB_SIZE, family="mixtral").num_local_experts
8
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from llmsql.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

BYTE_VOCAB_SIZE = 257
"""Byte-level vocabulary: ids 0-255 are UTF-8 bytes, :data:`SEPARATOR` separates texts."""

SEPARATOR = 256
"""The id put between texts when they are packed into one training stream."""

FAMILIES: tuple[str, ...] = ("olmoe", "mixtral")
"""Model families :func:`tiny_moe_config` builds."""


def tiny_moe_config(
    vocab_size: int, *, layers: int = 4, experts: int = 8, top_k: int = 2,
    hidden: int = 128, intermediate: int = 256, family: str = "olmoe", heads: int = 4,
    max_positions: int = 512,
) -> PretrainedConfig:
    """The config of a tiny MoE causal LM (every layer MoE, fused experts of transformers 5).

    Raises:
        ConfigError: an unknown ``family`` or ``top_k`` larger than ``experts``.
    """
    if family not in FAMILIES:
        msg = f"family={family!r} is not a tiny MoE family; use one of {', '.join(FAMILIES)}"
        raise ConfigError(msg)
    if not 0 < top_k <= experts:
        msg = f"top_k={top_k} must be between 1 and experts={experts}; lower top_k"
        raise ConfigError(msg)
    shape: dict[str, Any] = {
        "vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
        "num_experts_per_tok": top_k, "max_position_embeddings": max_positions,
        "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
        "pad_token_id": 0, "bos_token_id": None, "eos_token_id": None,
    }
    if family == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(**shape, num_local_experts=experts)
    from transformers import OlmoeConfig

    return OlmoeConfig(**shape, num_experts=experts)


def text_token_ids(
    texts: Iterable[str], tokenizer: PreTrainedTokenizerBase | None = None
) -> list[list[int]]:
    """Token ids of each non-empty text: UTF-8 bytes without a tokenizer, else its ids."""
    kept = [t for t in texts if t]
    if tokenizer is None:
        return [list(t.encode("utf-8")) for t in kept]
    return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in kept]


def read_texts(
    path: str | os.PathLike[str], column: str, *, limit: int | None = None, skip: int = 0
) -> list[str]:
    """Non-empty strings of ``column`` in the parquet file ``path`` (rows ``skip`` onwards, at
    most ``limit`` of them), e.g. ``../shared/datasets/rotten_tomatoes_flatiron/reviews.parquet``
    column ``review``.

    Raises:
        ConfigError: the file is missing or unreadable, or has no such column.
    """
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    try:
        table = pq.read_table(path, columns=[column])
    except (OSError, KeyError, ValueError) as exc:
        msg = (f"cannot read column {column!r} of {os.fspath(path)!r}: {exc}; pass a parquet "
               "file of ../shared/datasets and one of its string columns")
        raise ConfigError(msg) from exc
    texts = [t for t in table.column(column).to_pylist() if isinstance(t, str) and t.strip()]
    return texts[skip:] if limit is None else texts[skip:skip + limit]


def train_tiny_moe(
    token_ids: Sequence[Sequence[int]], config: PretrainedConfig, *, steps: int = 300,
    batch_rows: int = 16, seq_len: int = 64, lr: float = 3e-3, seed: int = 0,
    device: str = "cpu",
) -> PreTrainedModel:
    """Train a model of ``config`` (random init from ``seed``) as a next-token LM on windows of
    the texts ``token_ids`` packed into one stream (separated by :data:`SEPARATOR`, or id 0 when
    the vocabulary has no room for it); AdamW, linear warm-up then cosine decay, plus the
    router load-balancing loss where the config has one (so experts stay in use).

    Deterministic for a seed on the CPU (GPU kernels may not be). Returns the model in eval
    mode.

    Raises:
        ConfigError: the texts hold fewer than ``seq_len + 1`` tokens.
    """
    from llmsql.engine.model import from_config

    stream = _packed(token_ids, config.vocab_size)
    if stream.numel() <= seq_len:
        msg = (f"the training texts hold {stream.numel()} tokens, fewer than seq_len + 1 = "
               f"{seq_len + 1}; pass more texts or a smaller seq_len")
        raise ConfigError(msg)
    model = from_config(config, seed=seed, device=device, dtype="float32")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(steps))
    generator = torch.Generator().manual_seed(seed)
    aux = getattr(config, "output_router_logits", None) is not None
    for _ in range(steps):
        batch = _windows(stream, batch_rows, seq_len, generator).to(device)
        extra = {"output_router_logits": True} if aux else {}
        loss = model(input_ids=batch, labels=batch, **extra).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return model.eval()


def lm_loss(model: PreTrainedModel, token_ids: Sequence[Sequence[int]], *,
            seq_len: int = 64) -> float:
    """Mean next-token cross-entropy of ``model`` on consecutive windows of the packed texts
    (a quick check that training learned something).
    """
    from llmsql.engine.moe.trace import input_device

    stream = _packed(token_ids, model.config.vocab_size)
    rows = stream.numel() // (seq_len + 1)
    batch = stream[: rows * (seq_len + 1)].view(rows, seq_len + 1)
    device = input_device(model)
    with torch.no_grad():
        out = model(input_ids=batch.to(device), labels=batch.to(device))
    return float(out.loss)


def _packed(token_ids: Sequence[Sequence[int]], vocab_size: int) -> torch.Tensor:
    sep = SEPARATOR if vocab_size > SEPARATOR else 0
    flat: list[int] = []
    for ids in token_ids:
        flat.extend(ids)
        flat.append(sep)
    return torch.tensor(flat, dtype=torch.long)


def _windows(stream: torch.Tensor, rows: int, seq_len: int,
             generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, stream.numel() - seq_len, (rows,), generator=generator)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


def _warmup_cosine(steps: int) -> Any:
    import math

    warm = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    return factor
