"""The adapter seam: LoRA adapters on a tiny random-weight Llama."""

from __future__ import annotations

import pytest
import torch

from llmsql.engine import (
    AdaptedLinear,
    Engine,
    Job,
    adapter_parameters,
    add_adapters,
    from_config,
    lora,
)
from llmsql.errors import ConfigError
from tests.engine.conftest import llama_config

IDS = torch.tensor([[1, 5, 9, 33, 7, 41]])


def _model():  # type: ignore[no-untyped-def]
    return from_config(llama_config(), seed=0)


def _logits(model) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.inference_mode():
        return model(input_ids=IDS).logits


def test_fresh_lora_adapters_change_nothing() -> None:
    model = _model()
    before = _logits(model)
    names = add_adapters(model, ("q_proj", "v_proj"), lora(rank=4))
    assert names == [f"model.layers.{i}.self_attn.{p}"
                     for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert all(isinstance(model.get_submodule(n), AdaptedLinear) for n in names)
    assert torch.equal(_logits(model), before)


def test_trained_adapters_change_the_output() -> None:
    model = _model()
    before = _logits(model)
    add_adapters(model, ("q_proj", "v_proj"), lora(rank=4))
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.normal_(0, 0.5)
    assert not torch.allclose(_logits(model), before)


def test_only_the_adapters_get_gradients() -> None:
    model = _model()
    add_adapters(model, ("o_proj",), lora(rank=2))
    for p in model.parameters():
        p.requires_grad_(False)
    params = adapter_parameters(model)
    assert len(params) == 2 * 2  # two layers, down and up each
    for p in params:
        p.requires_grad_(True)
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    up = [p for n, p in model.named_parameters() if n.endswith("adapter.up.weight")]
    assert all(float(p.grad.abs().sum()) > 0 for p in up)  # type: ignore[union-attr]


def test_the_engine_runs_with_adapters() -> None:
    job = Job(0, (5, 6, 7, 8), budget=6, ignore_eos=True)
    expected = Engine(_model(), eos=[2], pad=0).run([job])
    adapted = _model()
    add_adapters(adapted, ("q_proj", "k_proj", "v_proj", "o_proj"), lora())
    assert Engine(adapted, eos=[2], pad=0).run([job]) == expected


def test_unknown_targets_are_refused() -> None:
    with pytest.raises(ConfigError, match="no linear layer.*qproj"):
        add_adapters(_model(), ("qproj",), lora())
