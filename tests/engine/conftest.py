"""Tiny random-weight models (hidden 64, 2 layers) for the engine's tests: built from configs
in well under a second on the CPU, so every seam is tested on a real architecture."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("torch")

TINY: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention, as SmolLM2
    "vocab_size": 96,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "tie_word_embeddings": False,
}
"""The shape every tiny config shares."""


def llama_config(**overrides: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY, **overrides})


def mixtral_config() -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2)


def qwen2_moe_config() -> Any:
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(**TINY, num_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=32, shared_expert_intermediate_size=64,
                          decoder_sparse_step=1, mlp_only_layers=[])


def olmoe_config() -> Any:
    from transformers import OlmoeConfig

    return OlmoeConfig(**TINY, num_experts=4, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def llama() -> Any:
    """A 2-layer Llama with random weights (seed 0), float32 on the CPU."""
    from llmsql.engine import from_config

    return from_config(llama_config(), seed=0)
