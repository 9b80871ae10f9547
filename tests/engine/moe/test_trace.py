"""Routing traces on tiny random MoE models (Mixtral, Qwen2-MoE with a dense layer, OLMoE):
the recorded router inputs and routes line up across layers, match what the router computes,
leave padding out, and the experts modules are put back, even when the forward fails."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from llmsql.engine import from_config  # noqa: E402
from llmsql.engine.moe.trace import (  # noqa: E402
    RoutingTrace,
    moe_layer_index,
    moe_layers,
    record_routing,
)
from llmsql.errors import ConfigError  # noqa: E402
from tests.engine.conftest import (  # noqa: E402
    TINY,
    llama_config,
    mixtral_config,
    olmoe_config,
    qwen2_moe_config,
)

PROMPTS = [[5, 9, 14, 3, 7, 22, 40], [11, 12], [8, 30, 31, 32, 33], [60]]


def qwen_with_dense_layer() -> Any:
    """3 layers, layer 1 dense (mlp_only_layers): MoE layers 0 and 2."""
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(**{**TINY, "num_hidden_layers": 3}, num_experts=4,
                          num_experts_per_tok=2, moe_intermediate_size=32,
                          shared_expert_intermediate_size=64, decoder_sparse_step=1,
                          mlp_only_layers=[1])


CONFIGS = {"mixtral": mixtral_config, "qwen2_moe": qwen2_moe_config, "olmoe": olmoe_config,
           "qwen2_moe_dense": qwen_with_dense_layer}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request: pytest.FixtureRequest) -> Any:
    torch.set_num_threads(1)
    return from_config(CONFIGS[request.param](), seed=0, dtype="float32")


def test_moe_layer_index_parses_layer_names() -> None:
    assert moe_layer_index("model.layers.0.mlp.experts") == 0
    assert moe_layer_index("model.layers.17.block_sparse_moe.experts") == 17
    with pytest.raises(ConfigError, match="no 'layers.<i>.'"):
        moe_layer_index("decoder.experts")


def test_moe_layers_lists_experts_modules(model: Any) -> None:
    found = moe_layers(model)
    layers = [i for i, _ in found]
    n = model.config.num_hidden_layers
    expected = [0, 2] if getattr(model.config, "mlp_only_layers", None) else list(range(n))
    assert layers == expected
    assert all(name == f"model.layers.{i}.mlp.experts" for i, name in found)


def test_moe_layers_of_a_dense_model_is_empty_and_recording_refuses_it() -> None:
    dense = from_config(llama_config(), seed=0)
    assert moe_layers(dense) == []
    with pytest.raises(ConfigError, match="no mixture-of-experts"):
        record_routing(dense, [PROMPTS])


def router_input(model: Any, ids: list[int], layer: int) -> Any:
    """The post-attention-norm hidden states entering ``layer``'s MoE block (hooked on the
    block, independently of the recorder), and the router's top-k on them."""
    block = model.get_submodule(f"model.layers.{layer}.mlp")
    seen: list[Any] = []
    handle = block.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    hidden = seen[0].reshape(-1, seen[0].shape[-1])
    top = block.gate(hidden)[2]
    return hidden, top


def test_recorded_routes_match_the_router_and_skip_padding(model: Any) -> None:
    trace = record_routing(model, [PROMPTS[:3], PROMPTS[3:]])
    n = sum(len(p) for p in PROMPTS)
    assert trace.layers == tuple(i for i, _ in moe_layers(model))
    assert trace.num_tokens == n == trace.tokens_seen and trace.prompts == len(PROMPTS)
    assert trace.top_k == 2 and trace.num_experts == 4
    for layer in trace.layers:
        assert trace.hidden[layer].shape == (n, TINY["hidden_size"])
        assert trace.hidden[layer].dtype == torch.float16
        assert trace.routes[layer].shape == (n, 2)
        # token t of every layer is the t-th real token of the prompts, in order
        start = 0
        for prompt in PROMPTS:
            hidden, top = router_input(model, prompt, layer)
            rows = slice(start, start + len(prompt))
            torch.testing.assert_close(trace.hidden[layer][rows].float(), hidden,
                                       atol=2e-3, rtol=2e-3)
            assert torch.equal(trace.routes[layer][rows].long(), top)
            start += len(prompt)


def test_a_tensor_batch_records_every_position(model: Any) -> None:
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    trace = record_routing(model, [ids, torch.tensor([3, 4])])
    assert trace.num_tokens == 10 and trace.prompts == 3


def test_experts_modules_are_restored_after_recording_and_after_a_failure(model: Any) -> None:
    before = {name: model.get_submodule(name) for _, name in moe_layers(model)}
    record_routing(model, [PROMPTS])
    assert {n: model.get_submodule(n) for n in before} == before

    def failing() -> Any:
        yield PROMPTS
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        record_routing(model, failing())
    assert all(model.get_submodule(n) is m for n, m in before.items())
    assert not model.training


def test_a_replaced_experts_module_is_recorded_through_its_call(model: Any) -> None:
    """Recording relies only on the call ``experts(hidden, top_k_index, top_k_weights)``."""
    from llmsql.engine.experts import replace_experts

    class Passthrough(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.wrapped = inner
            self.calls = 0

        def forward(self, h: Any, idx: Any, w: Any) -> Any:
            self.calls += 1
            return self.wrapped(h, idx, w)

    plain = record_routing(model, [PROMPTS])
    originals = {n: model.get_submodule(n) for _, n in moe_layers(model)}
    replace_experts(model, lambda _n, m: Passthrough(m))
    try:
        wrapped = record_routing(model, [PROMPTS])
        assert all(model.get_submodule(n).calls == 1 for n in originals)
    finally:
        for name, module in originals.items():
            model.set_submodule(name, module)
    for layer in plain.layers:
        assert torch.equal(plain.routes[layer], wrapped.routes[layer])


def test_subsampling_keeps_the_same_tokens_in_every_layer(model: Any) -> None:
    batches = [[list(range(3 + r, 40 + r))] for r in range(6)]
    full = record_routing(model, batches)
    sample = record_routing(model, batches, max_tokens=50, seed=3)
    assert sample.num_tokens == 50 and sample.tokens_seen == full.num_tokens
    # find each sampled token in the full trace by its hidden state: same rows in all layers
    first = full.layers[0]
    rows = [int(torch.nonzero((full.hidden[first] == h).all(1))[0, 0])
            for h in sample.hidden[first]]
    assert rows == sorted(rows)  # original order kept
    for layer in full.layers:
        assert torch.equal(full.hidden[layer][rows], sample.hidden[layer])
        assert torch.equal(full.routes[layer][rows], sample.routes[layer])
    again = record_routing(model, batches, max_tokens=50, seed=3)
    assert torch.equal(again.routes[first], sample.routes[first])


def test_empty_batches_are_refused(model: Any) -> None:
    with pytest.raises(ConfigError, match="no token"):
        record_routing(model, [])


def test_save_and_load_round_trip(model: Any, tmp_path: Path) -> None:
    trace = record_routing(model, [PROMPTS])
    path = tmp_path / "routing.pt"
    trace.save(path)
    back = RoutingTrace.load(path)
    assert (back.layers, back.num_experts, back.top_k, back.model, back.tokens_seen,
            back.prompts) == (trace.layers, trace.num_experts, trace.top_k, trace.model,
                              trace.tokens_seen, trace.prompts)
    for layer in trace.layers:
        assert torch.equal(back.hidden[layer], trace.hidden[layer])
        assert torch.equal(back.routes[layer], trace.routes[layer])


@pytest.mark.parametrize("case", ["missing", "garbage", "truncated", "other_format",
                                  "malformed"])
def test_bad_trace_files_raise_config_error(case: str, tmp_path: Path) -> None:
    model = from_config(olmoe_config(), seed=0, dtype="float32")
    path = tmp_path / "routing.pt"
    if case != "missing":
        record_routing(model, [PROMPTS]).save(path)
    if case == "garbage":
        path.write_bytes(b"this is not a torch file")
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif case == "other_format":
        torch.save({"weights": torch.zeros(3)}, path)
    elif case == "malformed":
        data = torch.load(path, weights_only=True)
        del data["routes"][str(data["layers"][0])]
        torch.save(data, path)
    with pytest.raises(ConfigError) as info:
        RoutingTrace.load(path)
    assert str(path) in str(info.value) and "record it again" in str(info.value)
