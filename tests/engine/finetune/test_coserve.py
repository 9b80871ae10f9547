"""Co-serving core (issue 16): the chunked, layer-by-layer fine-tuning step gives the LoRA
gradients and the loss curve of one plain backward, on tiny random Llamas and on SmolLM2."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch

from llmsql.engine import from_config
from llmsql.engine.finetune import ChunkedStep, attach_lora, lora_impl, plan_iteration
from llmsql.errors import ConfigError, ExecutionError
from tests.engine.conftest import llama_config

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")
TOL = 1e-5


def _sequence(tokens: int = 23, seed: int = 0, vocab: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels, the first five tokens unlabelled (a prompt)."""
    ids = torch.randint(3, vocab, (1, tokens), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[0, :5] = -100
    return ids, labels


def _model(*, impl: str = "engine", layers: int = 3) -> tuple[Any, list[torch.nn.Parameter]]:
    """A tiny Llama with LoRA on every attention projection and down_proj; the adapters'
    B is drawn nonzero so every adapter weight gets a gradient."""
    model = from_config(llama_config(num_hidden_layers=layers), seed=0)
    params = attach_lora(model, rank=4, alpha=8, target_modules=TARGETS, seed=1, impl=impl)
    _randomize(params)
    return model, params


def _randomize(params: list[torch.nn.Parameter]) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _plain(model: Any, params: list[torch.nn.Parameter], ids: torch.Tensor,
           labels: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in params]


def _max_diff(grads: list[torch.Tensor], params: list[torch.nn.Parameter]) -> float:
    return max(float((g - p.grad).abs().max()) for g, p in zip(grads, params, strict=True))


@pytest.mark.parametrize(("chunk_tokens", "layers_per_step"),
                         [(1, 1), (4, 2), (5, 1), (7, 3), (23, 1), (64, 2)])
def test_chunked_step_gradients_equal_one_plain_backward(chunk_tokens: int,
                                                         layers_per_step: int) -> None:
    ids, labels = _sequence()
    model, params = _model()
    want_loss, want = _plain(model, params, ids, labels)
    model, params = _model()
    step = ChunkedStep(model, ids, labels)
    loss = step.run(chunk_tokens=chunk_tokens, layers_per_step=layers_per_step)
    assert step.done
    assert abs(loss - want_loss) <= TOL
    assert _max_diff(want, params) <= TOL
    assert all(float(p.grad.abs().max()) > 0 for p in params)


def test_later_chunks_reach_earlier_chunks_adapters_through_the_cache() -> None:
    # only the second chunk's tokens are labelled: every gradient of the first chunk's
    # keys and values comes through the KV cache
    ids, labels = _sequence(tokens=12)
    labels[0, :9] = -100  # positions 0..7 predict labels 1..8
    model, params = _model()
    _, want = _plain(model, params, ids, labels)
    model, params = _model()
    step = ChunkedStep(model, ids, labels)
    assert step.forward_some(8) == 8
    assert step.loss == 0.0  # the first chunk predicts nothing labelled
    step.run(chunk_tokens=4, layers_per_step=1)
    assert _max_diff(want, params) <= TOL


def test_only_lora_parameters_get_gradients() -> None:
    ids, labels = _sequence()
    model, params = _model()
    ChunkedStep(model, ids, labels).run(chunk_tokens=6, layers_per_step=2)
    lora_ids = {id(p) for p in params}
    assert len(params) == 3 * len(TARGETS) * 2  # layers x targets x (A, B)
    for name, p in model.named_parameters():
        if id(p) in lora_ids:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_backward_runs_layers_per_call_from_the_last_layer_down() -> None:
    ids, labels = _sequence()
    model, params = _model(layers=3)
    step = ChunkedStep(model, ids, labels)
    assert step.forward_some(10) == 10
    with pytest.raises(ExecutionError, match="forward_some"):
        step.backward_some(1)
    assert step.forward_some(10) == 10 and step.forward_some(10) == 3  # 23 tokens
    assert step.forward_some(10) == 0 and step.pending_forward_tokens == 0
    assert all(p.grad is None for p in params)  # no layer's backward has run yet
    assert step.backward_some(2) == 2 and step.pending_backward_layers == 1
    layer0 = [p for n, p in model.named_parameters() if "layers.0." in n and p.requires_grad]
    layer2 = [p for n, p in model.named_parameters() if "layers.2." in n and p.requires_grad]
    assert all(p.grad is None for p in layer0) and all(p.grad is not None for p in layer2)
    assert step.backward_some(5) == 1 and step.done and step.backward_some(1) == 0


def test_training_curve_matches_plain_training_under_a_co_serving_load() -> None:
    """20 AdamW steps: plain PEFT-style training vs the chunked step driven by the token
    rule under a varying inference load (budget 16, fine-tuning cap 6, one layer of backward
    per iteration)."""
    data = [_sequence(tokens=15 + i % 4, seed=i) for i in range(5)]
    model, params = _model(layers=2)
    opt = torch.optim.AdamW(params, lr=1e-2)
    plain = []
    for i in range(20):
        ids, labels = data[i % len(data)]
        opt.zero_grad()
        plain.append(_plain(model, params, ids, labels)[0])
        opt.step()
    model, params = _model(layers=2)
    opt = torch.optim.AdamW(params, lr=1e-2)
    inference = torch.randint(0, 20, (400,), generator=torch.Generator().manual_seed(5))
    coserved, iterations = [], 0
    for i in range(20):
        ids, labels = data[i % len(data)]
        opt.zero_grad()
        step = ChunkedStep(model, ids, labels)
        while not step.done:
            load = int(inference[iterations])
            iterations += 1
            k = plan_iteration(load, 16, step.pending_forward_tokens, 6)
            assert k + load <= max(16, load) and k <= 6
            if step.pending_forward_tokens:
                step.forward_some(k)
            else:
                step.backward_some(1)
        coserved.append(step.loss)
        opt.step()
    assert max(abs(a - b) for a, b in zip(plain, coserved, strict=True)) <= TOL
    assert coserved[15] < coserved[0] - 0.1  # it trains: the same sample, three epochs on
    assert iterations > 20 * 5  # several iterations per sample: it was interleaved


def test_attach_lora_leaves_outputs_and_is_seeded() -> None:
    ids, _ = _sequence()
    base = from_config(llama_config(), seed=0)
    with torch.inference_mode():
        before = base(input_ids=ids).logits
    a = from_config(llama_config(), seed=0)
    b = from_config(llama_config(), seed=0)
    pa = attach_lora(a, rank=2, alpha=4, target_modules=("q_proj", "v_proj"), seed=7)
    pb = attach_lora(b, rank=2, alpha=4, target_modules=("q_proj", "v_proj"), seed=7)
    with torch.inference_mode():
        assert torch.equal(a(input_ids=ids).logits, before)
    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    c = from_config(llama_config(), seed=0)
    pc = attach_lora(c, rank=2, alpha=4, target_modules=("q_proj", "v_proj"), seed=8)
    assert not torch.equal(pa[0], pc[0])


def test_lora_dropout_is_applied_in_training_mode_only() -> None:
    ids, _ = _sequence()
    model = from_config(llama_config(), seed=0)
    params = attach_lora(model, rank=2, alpha=4, target_modules=("q_proj",), dropout=0.5)
    _randomize(params)
    with torch.inference_mode():
        evaluated = model(input_ids=ids).logits
        model.train()
        trained = model(input_ids=ids).logits
    assert not torch.equal(evaluated, trained)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"rank": 0}, "rank"), ({"alpha": 0}, "alpha"), ({"dropout": 1.0}, "dropout"),
    ({"target_modules": ()}, "target_modules"), ({"target_modules": ("nope",)}, "nope"),
    ({"impl": "other"}, "impl|unknown"),
])
def test_attach_lora_rejects_bad_options(kwargs: dict[str, Any], match: str) -> None:
    model = from_config(llama_config(), seed=0)
    options: dict[str, Any] = {"rank": 2, "alpha": 4, "target_modules": ("q_proj",), **kwargs}
    with pytest.raises(ConfigError, match=match):
        attach_lora(model, **options)


def test_chunked_step_rejects_bad_sequences() -> None:
    model, _ = _model(layers=1)
    ids, labels = _sequence()
    with pytest.raises(ConfigError, match="one"):
        ChunkedStep(model, ids.repeat(2, 1))
    with pytest.raises(ConfigError, match="one label per token"):
        ChunkedStep(model, ids, labels[:, :-1])
    with pytest.raises(ConfigError, match="no token"):
        ChunkedStep(model, ids, torch.full_like(ids, -100))
    step = ChunkedStep(model, ids, labels)
    with pytest.raises(ConfigError, match=">= 0"):
        step.forward_some(-1)
    with pytest.raises(ConfigError, match=">= 1"):
        step.run(chunk_tokens=0, layers_per_step=1)


def test_lora_impl_names_what_is_installed() -> None:
    has_peft = importlib.util.find_spec("peft") is not None
    assert lora_impl("auto") == ("peft" if has_peft else "engine")
    assert lora_impl("engine") == "engine"
    if not has_peft:
        with pytest.raises(ConfigError, match="pip install peft"):
            lora_impl("peft")


def test_peft_adapters_give_the_same_chunked_gradients() -> None:
    pytest.importorskip("peft")
    ids, labels = _sequence()
    model, params = _model(impl="peft")
    _, want = _plain(model, params, ids, labels)
    model, params = _model(impl="peft")
    ChunkedStep(model, ids, labels).run(chunk_tokens=5, layers_per_step=2)
    assert _max_diff(want, params) <= TOL


@pytest.mark.parametrize(("inference", "budget", "pending", "cap", "want"), [
    (0, 256, 1000, 128, 128), (128, 256, 1000, 256, 128), (256, 256, 1000, 128, 0),
    (400, 256, 1000, 128, 0), (0, 256, 3, 128, 3), (255, 256, 1000, 128, 1),
    (10, 256, 1000, 0, 0), (0, 1, 0, 1, 0),
])
def test_plan_iteration_fills_what_inference_leaves(inference: int, budget: int,
                                                     pending: int, cap: int, want: int) -> None:
    assert plan_iteration(inference, budget, pending, cap) == want


@pytest.mark.parametrize("args", [(-1, 256, 10, 8), (0, 0, 10, 8), (0, 256, -1, 8),
                                  (0, 256, 10, -8)])
def test_plan_iteration_rejects_bad_counts(args: tuple[int, int, int, int]) -> None:
    with pytest.raises(ConfigError):
        plan_iteration(*args)


@pytest.mark.model
def test_smollm2_chunked_gradients_equal_one_plain_backward() -> None:
    from llmsql.engine import load_model
    from llmsql.models import resolve_model

    def lora_model() -> tuple[Any, list[torch.nn.Parameter]]:
        model = load_model(resolve_model(None), dtype="float32")
        params = attach_lora(model, rank=8, alpha=16, target_modules=("q_proj", "v_proj"),
                             seed=0, impl="engine")
        _randomize(params)
        return model, params

    ids, labels = _sequence(tokens=40, vocab=49152)
    model, params = lora_model()
    want_loss, want = _plain(model, params, ids, labels)
    model, params = lora_model()
    step = ChunkedStep(model, ids, labels)
    assert abs(step.run(chunk_tokens=16, layers_per_step=4) - want_loss) <= 1e-4
    assert _max_diff(want, params) <= TOL


def test_the_package_shadows_nothing_in_the_engine() -> None:
    import llmsql.engine
    import llmsql.engine.finetune  # noqa: F401

    assert callable(llmsql.engine.lora)  # the adapter factory, not a subpackage
