"""The expert seam on tiny random-weight MoE models (Mixtral, Qwen2-MoE, OLMoE)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from llmsql.engine import Engine, Job, find_experts, from_config, replace_experts
from llmsql.errors import ConfigError
from tests.engine.conftest import llama_config, mixtral_config, olmoe_config, qwen2_moe_config

CONFIGS = {"mixtral": mixtral_config, "qwen2_moe": qwen2_moe_config, "olmoe": olmoe_config}
IDS = torch.tensor([[1, 5, 9, 33, 7, 41, 60, 2]])


class CountingExperts(nn.Module):
    """Wraps the original experts: counts the tokens routed to each expert, then delegates
    (what an offloading cache does before it fetches weights)."""

    def __init__(self, inner: nn.Module, num_experts: int) -> None:
        super().__init__()
        self.inner = inner
        self.routed = torch.zeros(num_experts, dtype=torch.long)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        self.routed += torch.bincount(top_k_index.flatten(), minlength=len(self.routed))
        out: torch.Tensor = self.inner(hidden, top_k_index, top_k_weights)
        return out


class CopiedExperts(nn.Module):
    """Recomputes the experts from per-expert copies of their weights, one expert at a time
    (the layout of host-memory slabs an offloading module keeps)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.gate_up = [w.detach().clone() for w in inner.gate_up_proj]
        self.down = [w.detach().clone() for w in inner.down_proj]
        self.act = inner.act_fn

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for e in range(len(self.gate_up)):
            token, slot = torch.where(top_k_index == e)
            if len(token):
                gate, up = nn.functional.linear(hidden[token], self.gate_up[e]).chunk(2, dim=-1)
                y = nn.functional.linear(self.act(gate) * up, self.down[e])
                out.index_add_(0, token, y * top_k_weights[token, slot, None])
        return out


def _logits(model: Any) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_wrapping_the_experts_changes_nothing(arch: str) -> None:
    model = from_config(CONFIGS[arch](), seed=0)
    before = _logits(model)
    names = replace_experts(model, lambda name, m: CountingExperts(m, 4))
    assert names == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    swapped = [m for _, m in find_experts(model)]
    assert all(isinstance(m, CountingExperts) for m in swapped)
    assert torch.equal(_logits(model), before)
    # every token went through each layer's replacement, k = 2 experts each
    assert [int(m.routed.sum()) for m in swapped] == [2 * IDS.shape[1]] * 2


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_a_recomputing_replacement_gives_the_same_logits(arch: str) -> None:
    model = from_config(CONFIGS[arch](), seed=0)
    before = _logits(model)
    replace_experts(model, lambda name, m: CopiedExperts(m))
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=1e-5)


def test_the_replacement_is_what_runs() -> None:
    model = from_config(mixtral_config(), seed=0)
    before = _logits(model)

    class Nothing(nn.Module):
        def forward(self, hidden: torch.Tensor, *_: Any) -> torch.Tensor:
            return torch.zeros_like(hidden)

    replace_experts(model, lambda name, m: Nothing())
    assert not torch.allclose(_logits(model), before)


def test_the_engine_runs_a_model_with_replaced_experts() -> None:
    plain = from_config(mixtral_config(), seed=0)
    wrapped = from_config(mixtral_config(), seed=0)
    replace_experts(wrapped, lambda name, m: CountingExperts(m, 4))
    job = Job(0, (5, 6, 7, 8), budget=6, ignore_eos=True)
    expected = Engine(plain, eos=[2], pad=0).run([job])
    assert Engine(wrapped, eos=[2], pad=0).run([job]) == expected


def test_a_dense_model_has_no_experts() -> None:
    model = from_config(llama_config(), seed=0)
    assert find_experts(model) == []
    with pytest.raises(ConfigError, match="no mixture-of-experts modules.*MoE model"):
        replace_experts(model, lambda name, m: m)
