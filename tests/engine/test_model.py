"""Getting a model: from a config with random weights, or from a folder."""

from __future__ import annotations

import pathlib
from typing import Any

import torch

from llmsql.engine import ATTENTION, from_config, load_model, pad_id, stop_ids
from tests.engine.conftest import llama_config


def _weights(model: Any) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_from_config_is_seeded_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = from_config(llama_config(), seed=0)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random stream is untouched
    b = from_config(llama_config(), seed=0)
    c = from_config(llama_config(), seed=1)
    assert all(torch.equal(x, y) for x, y in zip(_weights(a), _weights(b), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(_weights(a), _weights(c), strict=True))


def test_from_config_is_ready_to_run(llama: Any) -> None:
    assert not llama.training
    assert llama.config._attn_implementation == ATTENTION
    assert llama.dtype == torch.float32  # "auto" on the CPU
    half = from_config(llama_config(), seed=0, dtype="bfloat16")
    assert half.dtype == torch.bfloat16


def test_stop_and_pad_tokens_without_a_tokenizer(llama: Any) -> None:
    assert stop_ids(None, llama) == [2]
    assert pad_id(None, [2]) == 2
    assert pad_id(None, []) == 0


def test_load_model_from_a_folder_gives_the_same_model(llama: Any, tmp_path: pathlib.Path) -> None:
    llama.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.config._attn_implementation == ATTENTION and not loaded.training
    ids = torch.tensor([[1, 5, 9, 33, 7]])
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=ids).logits, llama(input_ids=ids).logits)
