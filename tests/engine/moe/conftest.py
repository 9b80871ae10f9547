"""Tiny MoE configs of each supported family (fp32, CPU) for the offload tests."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("torch")

from tests.engine.conftest import TINY  # noqa: E402

SHAPE: dict[str, Any] = {**TINY, "hidden_size": 32, "intermediate_size": 48,
                         "num_hidden_layers": 4}
"""The engine tests' tiny shape, narrower and with four layers (room for lookahead)."""


def moe_config(family: str) -> Any:
    """A 4-layer, 8-expert, top-2 config of ``family`` (Qwen2-MoE with one dense layer)."""
    import transformers as tf

    if family == "mixtral":
        return tf.MixtralConfig(**SHAPE, num_local_experts=8, num_experts_per_tok=2)
    if family == "olmoe":
        return tf.OlmoeConfig(**SHAPE, num_experts=8, num_experts_per_tok=2)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**SHAPE, num_experts=8, num_experts_per_tok=2,
                                 moe_intermediate_size=40, shared_expert_intermediate_size=24,
                                 mlp_only_layers=[1])
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**SHAPE, num_experts=8, num_experts_per_tok=2,
                                 moe_intermediate_size=40, head_dim=8)
    raise ValueError(family)


FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
