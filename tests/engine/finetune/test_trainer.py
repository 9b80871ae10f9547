"""Trainer (issue 16): the loss curve and the weights of plain PEFT training, pieces that run
between inference passes (even from inside one), and checkpoints that resume to the same
weights."""

from __future__ import annotations

import importlib.util
import os
import threading
from typing import Any

import pytest
import torch

from llmsql.engine import Engine, Job, from_config
from llmsql.engine.finetune import IGNORE, Trainer, TrainSeq, attach_lora
from llmsql.engine.finetune.train import CHECKPOINT_FILE
from llmsql.errors import ConfigError, ExecutionError
from tests.engine.conftest import llama_config

IMPL = "peft" if importlib.util.find_spec("peft") is not None else "engine"
TARGETS = ("q_proj", "v_proj")


def _model(impl: str = IMPL, dtype: torch.dtype = torch.float32,
           ) -> tuple[Any, list[torch.nn.Parameter]]:
    """A 2-layer Llama with LoRA on q_proj and v_proj, B drawn nonzero."""
    model = from_config(llama_config(), seed=0).to(dtype)
    params = attach_lora(model, rank=4, alpha=8, target_modules=TARGETS, seed=1, impl=impl)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.1)
    return model, params


def _data(count: int = 5, seed: int = 0) -> list[TrainSeq]:
    """Sequences of 9-13 tokens whose first four tokens are an unlabelled prompt."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        ids = torch.randint(3, 96, (9 + i % 5,), generator=gen).tolist()
        out.append(TrainSeq(tuple(ids), (IGNORE,) * 4 + tuple(ids[4:])))
    return out


def _order(n: int, seed: int, epoch: int) -> list[int]:
    """The documented epoch order."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def _plain_training(data: list[TrainSeq], *, lr: float, epochs: int, batch_size: int,
                    seed: int, dtype: torch.dtype = torch.float32,
                    ) -> tuple[list[float], list[torch.Tensor]]:
    """PEFT training the plain way: model(input_ids, labels=...).loss averaged over each
    batch's sequences, one backward, AdamW."""
    model, params = _model(dtype=dtype)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    curve = []
    for epoch in range(epochs):
        order = _order(len(data), seed, epoch)
        for start in range(0, len(order), batch_size):
            batch = [data[k] for k in order[start:start + batch_size]]
            opt.zero_grad()
            loss = sum(model(input_ids=torch.tensor([s.input_ids]),
                             labels=torch.tensor([s.labels])).loss for s in batch) / len(batch)
            loss.backward()
            opt.step()
            curve.append(float(loss.detach()))
    return curve, [p.detach().clone() for p in params]


def _close(a: list[torch.Tensor], b: list[torch.nn.Parameter] | list[torch.Tensor],
           tol: float) -> bool:
    return all(float((x - y).detach().abs().max()) <= tol for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(("dtype", "lr", "curve_tol", "weight_tol"), [
    # float32: AdamW divides by the gradient's running size, so an element whose gradient is
    # about 0 turns rounding into an lr-sized move: the weights agree to ~6e-5 after 6 steps
    # at lr 1e-3 (~6e-4 at 1e-2), while they moved ~6e-3
    (torch.float32, 1e-3, 1e-5, 2e-4),
    # float64: the same computation without that noise agrees to ~1e-13 at lr 1e-2 (the
    # chunked loss is computed in float32, so the curve agrees to ~1e-7)
    (torch.float64, 1e-2, 1e-6, 1e-10),
])
def test_loss_curve_and_weights_equal_plain_peft_training(dtype: torch.dtype, lr: float,
                                                          curve_tol: float,
                                                          weight_tol: float) -> None:
    data = _data(5)
    want_curve, want_params = _plain_training(data, lr=lr, epochs=2, batch_size=2, seed=4,
                                              dtype=dtype)
    model, params = _model(dtype=dtype)
    trainer = Trainer(model, params, data, lr=lr, epochs=2, batch_size=2, seed=4,
                      chunk_tokens=4)
    assert trainer.steps == 6  # 3 batches (2, 2, 1) per epoch
    trainer.run()
    assert trainer.done and trainer.step == 6
    assert [s for s, _ in trainer.loss_curve] == list(range(1, 7))
    got = [v for _, v in trainer.loss_curve]
    assert max(abs(a - b) / abs(b) for a, b in zip(got, want_curve, strict=True)) <= curve_tol
    assert _close(want_params, params, weight_tol)
    assert not _close(want_params, _model(dtype=dtype)[1], 10 * weight_tol)  # it trained
    assert trainer.tokens == 2 * sum(len(s.input_ids) for s in data)
    assert not model.training  # the model is left as it was (eval)


def test_pieces_between_inference_passes_give_the_same_training() -> None:
    """Forward pieces of 3 tokens, backward one layer at a time, with an Engine.run on other
    prompts between every two pieces and a piece run from inside torch.inference_mode (as
    the engine's hook does)."""
    data = _data(4, seed=1)
    want_curve, want_params = _plain_training(data, lr=5e-3, epochs=1, batch_size=3, seed=0)
    model, params = _model()
    engine = Engine(model, eos=[2], pad=0)
    trainer = Trainer(model, params, data, lr=5e-3, epochs=1, batch_size=3, seed=0)
    jobs = [Job(0, (5, 6, 7, 8), budget=3, ignore_eos=True)]
    answers, pieces = set(), 0
    while not trainer.done:
        if pieces % 2:
            with torch.inference_mode():
                trainer.work(3, 1)
        else:
            trainer.work(3, 1)
        answers.add(engine.run(jobs)[0].tokens)  # type: ignore[union-attr]
        pieces += 1
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        assert not model.training
    got = [v for _, v in trainer.loss_curve]
    assert max(abs(a - b) / abs(b) for a, b in zip(got, want_curve, strict=True)) <= 1e-5
    assert _close(want_params, params, 1e-5)
    forward_pieces = sum(-(-len(s.input_ids) // 3) for s in data)
    assert pieces == forward_pieces + 2 * len(data)  # + one piece per layer's backward
    assert len(answers) > 1  # inference saw the adapter change (no switching here)


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path: Any) -> None:
    data = _data(4, seed=2)
    options: dict[str, Any] = {"lr": 1e-2, "epochs": 2, "batch_size": 2, "seed": 3,
                               "chunk_tokens": 5, "checkpoint_every": 2}
    model, params = _model()
    Trainer(model, params, data, checkpoint_dir=str(tmp_path / "a"), **options).run()
    want = [p.detach().clone() for p in params]

    stop = threading.Event()
    model, params = _model()
    first = Trainer(model, params, data, checkpoint_dir=str(tmp_path / "b"), **options)

    def halt(trainer: Trainer) -> None:
        if trainer.step == 3:
            stop.set()

    first.run(stop, on_progress=halt)
    assert first.step == 3 and not first.done
    saved = torch.load(tmp_path / "b" / CHECKPOINT_FILE, weights_only=True)
    assert saved["step"] == 3  # the interruption wrote its checkpoint (every 2 would be 2)
    assert os.listdir(tmp_path / "b") == [CHECKPOINT_FILE]  # no temporary file left

    model, params = _model()  # a fresh process: the model as it was before training
    second = Trainer(model, params, data, checkpoint_dir=str(tmp_path / "b"), **options)
    assert second.resumed_from == 3 and second.loss_curve == first.loss_curve
    second.run()
    assert second.done and len(second.loss_curve) == second.steps
    assert _close(want, params, 1e-6)


def test_a_checkpoint_of_another_run_is_refused(tmp_path: Any) -> None:
    model, params = _model()
    trainer = Trainer(model, params, _data(3), lr=1e-2, epochs=1, batch_size=1, seed=0,
                      checkpoint_dir=str(tmp_path))
    trainer.work(100, 2)
    trainer.work(0, 2)  # the first sequence's backward ends step 1
    trainer.save_checkpoint()
    with pytest.raises(ConfigError, match="another training run"):
        Trainer(model, params, _data(3, seed=9), lr=1e-2, epochs=1, batch_size=1, seed=0,
                checkpoint_dir=str(tmp_path))


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path: Any,
                                                          monkeypatch: Any) -> None:
    model, params = _model()
    trainer = Trainer(model, params, _data(3), lr=1e-2, epochs=1, batch_size=1, seed=0,
                      checkpoint_dir=str(tmp_path), checkpoint_every=1)
    trainer.work(100, 2)
    trainer.work(0, 2)
    assert trainer.step == 1  # checkpointed at step 1
    before = (tmp_path / CHECKPOINT_FILE).read_bytes()

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    trainer.work(100, 2)
    with pytest.raises(ExecutionError, match="previous checkpoint is kept"):
        trainer.work(0, 2)
    monkeypatch.undo()
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == before
    assert os.listdir(tmp_path) == [CHECKPOINT_FILE]
    model, params = _model()
    assert Trainer(model, params, _data(3), lr=1e-2, epochs=1, batch_size=1, seed=0,
                   checkpoint_dir=str(tmp_path)).resumed_from == 1


def test_engine_adapters_train_too() -> None:
    data = _data(3)
    model, params = _model(impl="engine")
    trainer = Trainer(model, params, data, lr=5e-2, epochs=3, batch_size=3, seed=0)
    trainer.run()
    curve = [v for _, v in trainer.loss_curve]
    assert curve[-1] < curve[0]
    holdout = Trainer(model, params, data, lr=5e-2, epochs=1, batch_size=3, seed=0,
                      holdout=data).holdout_loss()
    assert holdout is not None and holdout < curve[0]


def test_holdout_loss_is_the_mean_sequence_loss() -> None:
    data = _data(3)
    model, params = _model()
    trainer = Trainer(model, params, data, lr=1e-2, epochs=1, batch_size=1, seed=0,
                      holdout=data[:2])
    with torch.no_grad():
        want = sum(float(model(input_ids=torch.tensor([s.input_ids]),
                               labels=torch.tensor([s.labels])).loss) for s in data[:2]) / 2
    assert trainer.holdout_loss() == pytest.approx(want, rel=1e-6)
    assert Trainer(model, params, data, lr=1e-2, epochs=1, batch_size=1,
                   seed=0).holdout_loss() is None


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lr": 0.0}, "lr"), ({"epochs": 0}, "epochs"), ({"batch_size": 0}, "batch_size"),
    ({"train": []}, "no training sequence"), ({"params": []}, "no parameter"),
    ({"checkpoint_every": 0}, "checkpoint_every"), ({"chunk_tokens": 0}, "chunk_tokens"),
])
def test_bad_options_are_refused(kwargs: dict[str, Any], match: str) -> None:
    model, params = _model()
    options: dict[str, Any] = {"params": params, "train": _data(2), "lr": 1e-2, "epochs": 1,
                               "batch_size": 1, "seed": 0, **kwargs}
    with pytest.raises(ConfigError, match=match):
        Trainer(model, options.pop("params"), options.pop("train"), **options)


def test_foreign_parameters_and_bad_sequences_are_refused() -> None:
    model, _ = _model()
    with pytest.raises(ConfigError, match="not a parameter"):
        Trainer(model, [torch.nn.Parameter(torch.zeros(2))], _data(2), lr=1e-2, epochs=1,
                batch_size=1, seed=0)
    with pytest.raises(ConfigError, match="one label per token"):
        TrainSeq((1, 2, 3), (1, 2))
    with pytest.raises(ConfigError, match="no label"):
        TrainSeq((1, 2, 3), (1, IGNORE, IGNORE))
    with pytest.raises(ConfigError, match=">= 0"):
        Trainer(model, list(model.parameters())[:1], _data(2), lr=1e-2, epochs=1,
                batch_size=1, seed=0).work(-1)
