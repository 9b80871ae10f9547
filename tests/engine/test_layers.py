"""The layer-range seam: embed, run_layers i..j and head compose to the full forward pass."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import DynamicCache

from llmsql.engine import embed, from_config, head, num_layers, run_layers
from llmsql.errors import ConfigError
from tests.engine.conftest import llama_config, mixtral_config

IDS = torch.tensor([[1, 5, 9, 33, 7, 41, 60], [1, 8, 8, 12, 90, 3, 4]])


def _full(model: Any, ids: torch.Tensor, **kw: Any) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, **kw).logits


@pytest.mark.parametrize("config", [llama_config, mixtral_config])
def test_all_layers_then_the_head_is_the_full_forward(config: Any) -> None:
    model = from_config(config(), seed=0)
    n = num_layers(model)
    assert n == 2
    with torch.inference_mode():
        whole = head(model, run_layers(model, embed(model, IDS), 0, n))
        h = run_layers(model, embed(model, IDS), 0, 1)
        split = head(model, run_layers(model, h, 1, n))
        same = run_layers(model, h, 1, 1)
    torch.testing.assert_close(whole, _full(model, IDS), rtol=0, atol=1e-5)
    assert torch.equal(split, whole)  # run_layers(0, k) then (k, n) composes exactly
    assert torch.equal(same, h)


def test_padding_and_positions_are_honoured(llama: Any) -> None:
    """Left padding: the mask hides the pads, explicit positions keep real tokens in place."""
    ids = torch.tensor([[0, 0, 5, 9, 33], [1, 8, 8, 12, 90]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        ours = head(llama, run_layers(llama, embed(llama, ids), 0, 2, position_ids=pos,
                                      attention_mask=mask))
    expected = _full(llama, ids, attention_mask=mask, position_ids=pos)
    torch.testing.assert_close(ours[:, 2:], expected[:, 2:], rtol=0, atol=1e-5)
    alone = _full(llama, ids[:1, 2:])  # the padded row equals its unpadded run
    torch.testing.assert_close(ours[:1, 2:], alone, rtol=0, atol=1e-4)


def test_each_half_keeps_the_kv_of_its_own_layers(llama: Any) -> None:
    """Two workers, layers 0..1 and 1..2, each with its own cache: prompt, then one decode
    step, gives the full model's logits for the new token."""
    prompt, new = IDS[:, :-1], IDS[:, -1:]
    first, second = DynamicCache(config=llama.config), DynamicCache(config=llama.config)
    with torch.inference_mode():
        for ids in (prompt, new):
            h = run_layers(llama, embed(llama, ids), 0, 1, cache=first)
            logits = head(llama, run_layers(llama, h, 1, 2, cache=second))
    assert first.get_seq_length(0) == second.get_seq_length(1) == IDS.shape[1]
    torch.testing.assert_close(logits[:, -1], _full(llama, IDS)[:, -1], rtol=0, atol=1e-4)


def test_sliding_window_layers() -> None:
    from transformers import Qwen2Config

    from tests.engine.conftest import TINY

    config = Qwen2Config(**TINY, use_sliding_window=True, sliding_window=3, max_window_layers=1,
                         layer_types=["full_attention", "sliding_attention"])
    model = from_config(config, seed=0)
    with torch.inference_mode():
        ours = head(model, run_layers(model, embed(model, IDS), 0, 2))
    torch.testing.assert_close(ours, _full(model, IDS), rtol=0, atol=1e-5)


def test_a_range_outside_the_model_is_refused(llama: Any) -> None:
    hidden = embed(llama, IDS)
    for start, stop in ((0, 3), (2, 1), (-1, 1)):
        with pytest.raises(ConfigError, match="not a range of the model's 2 layers"):
            run_layers(llama, hidden, start, stop)
