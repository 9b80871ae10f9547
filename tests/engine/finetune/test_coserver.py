"""CoServer and the step-time model (issue 16): training interleaved with an Engine's inference
passes gives plain PEFT's gradients, inference answers stay those of the model without the
training adapter, pieces are sized by the objective, and the counters add up."""

from __future__ import annotations

import contextlib
import importlib.util
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
import torch

from llmsql.engine import Engine, Job, StepTime, StepTimer, from_config
from llmsql.engine.finetune import (
    BACKWARD,
    FORWARD,
    IGNORE,
    CoServer,
    StepTimeModel,
    Trainer,
    TrainSeq,
    attach_lora,
)
from llmsql.errors import ConfigError, ExecutionError
from tests.engine.conftest import llama_config

if TYPE_CHECKING:
    from collections.abc import Iterator

IMPL = "peft" if importlib.util.find_spec("peft") is not None else "engine"
TARGETS = ("q_proj", "v_proj")


def _model(impl: str = IMPL) -> tuple[Any, list[torch.nn.Parameter]]:
    model = from_config(llama_config(), seed=0)
    params = attach_lora(model, rank=4, alpha=8, target_modules=TARGETS, seed=1, impl=impl)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model, params


def _data(count: int, seed: int = 0, length: int = 12) -> list[TrainSeq]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(3, 96, (length,), generator=gen).tolist()
        out.append(TrainSeq(tuple(ids), (IGNORE,) * 4 + tuple(ids[4:])))
    return out


def _jobs(count: int = 3) -> list[Job]:
    """Constrained-choice jobs (two choices, like LLM_FILTER's Yes/No) and one generation."""
    jobs = [Job(i, tuple(range(10 + i, 20 + 2 * i)), choices=((40, 2), (41, 2)))
            for i in range(count)]
    return [*jobs, Job(count, (7, 8, 9, 10, 11), budget=4, ignore_eos=True)]


def _engine(model: Any) -> Engine:
    return Engine(model, eos=[2], pad=0, batch_size=4)


def _capture_grads(trainer: Trainer) -> list[list[torch.Tensor]]:
    """The gradients each optimizer step sees (hooked before the step)."""
    seen: list[list[torch.Tensor]] = []

    def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
        seen.append([p.grad.detach().clone() for p in trainer.params])  # type: ignore[union-attr]

    trainer.optimizer.register_step_pre_hook(hook)
    return seen


def _plain_grads(data: list[TrainSeq]) -> list[torch.Tensor]:
    model, params = _model()
    loss = sum(model(input_ids=torch.tensor([s.input_ids]),
                     labels=torch.tensor([s.labels])).loss for s in data) / len(data)
    loss.backward()
    return [p.grad.detach().clone() for p in params]  # type: ignore[union-attr]


def test_coserved_gradients_equal_one_plain_backward() -> None:
    """One step over three sequences while another thread keeps the engine busy with
    inference: pieces run after inference passes (iterations > 0) and in between; the LoRA
    gradients equal one plain backward over the same tokens."""
    data = _data(3)
    want = _plain_grads(data)
    model, params = _model()
    model.eval()
    engine = _engine(model)
    coserver = CoServer(engine, token_budget=8, max_finetune_tokens=3)
    trainer = Trainer(model, params, data, lr=1e-3, epochs=1, batch_size=3, seed=0)
    grads = _capture_grads(trainer)
    with coserver.inference():  # hold the model so the first pieces run after passes
        job = coserver.submit(trainer)
        coserver.engine.run(_jobs())
    while not job.done():
        coserver.run(_jobs(1))
    job.result(timeout=60)
    coserver.close()
    assert len(grads) == 1
    assert max(float((g - w).abs().max()) for g, w in zip(grads[0], want, strict=True)) <= 1e-5
    stats = coserver.stats()
    assert stats.iterations > 0 and stats.finetune_tokens > 0
    assert stats.finetune_tokens + stats.background_tokens == trainer.tokens == 36
    assert engine.after_pass is None  # close detached it


def _enable_adapters(model: Any, on: bool) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in model.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.enable_adapters(on)


@contextlib.contextmanager
def _peft_switch(model: Any, on: bool) -> Iterator[None]:
    """The backend's ``activate``: enable the PEFT adapter for training, disable it after."""
    _enable_adapters(model, on)
    try:
        yield
    finally:
        _enable_adapters(model, False)


def test_inference_answers_stay_those_without_the_training_adapter(tmp_path: Any) -> None:
    pytest.importorskip("peft")
    model, params = _model(impl="peft")
    model.eval()
    with torch.inference_mode():
        with_adapter = _engine(model).run(_jobs())
    _enable_adapters(model, False)  # inference runs without the adapter
    engine = _engine(model)
    want = engine.run(_jobs())  # before any training
    assert with_adapter != want  # the adapter changes answers: a leak would show
    base = _engine(from_config(llama_config(), seed=0)).run(_jobs())
    assert _scores(want) == pytest.approx(_scores(base), abs=1e-5)  # the base model's
    engine.timer = StepTimer()
    coserver = CoServer(engine, slo_tpot_ms=1e4, token_budget=16, max_finetune_tokens=4,
                        activate=lambda on: _peft_switch(model, on))
    trainer = Trainer(model, params, _data(6), lr=1e-2, epochs=50, batch_size=2, seed=0,
                      checkpoint_dir=str(tmp_path))
    job = coserver.submit(trainer)
    _wait(lambda: trainer.tokens > 0)  # the background thread trains while nothing runs
    answers: list[Any] = []

    def serve() -> None:
        answers.extend(coserver.run(_jobs()) for _ in range(3))

    thread = threading.Thread(target=serve)
    tokens_before = trainer.tokens
    thread.start()
    thread.join(120)
    assert not thread.is_alive()
    assert all(a == want for a in answers)  # exactly the base model's answers
    assert trainer.tokens > tokens_before  # training went on during inference
    job.cancel()
    assert job.wait(60) and job.cancelled and not trainer.done
    with pytest.raises(ExecutionError, match="cancelled"):
        job.result()
    saved = torch.load(tmp_path / "trainer.pt", weights_only=True)
    assert saved["step"] == trainer.step  # the cancel wrote a checkpoint of the last step
    stats = coserver.stats()
    coserver.close()
    assert stats.inference_passes == len(engine.timer.steps)
    assert stats.inference_seconds == pytest.approx(sum(s.seconds for s in engine.timer.steps))
    assert 0 < stats.iterations <= stats.inference_passes
    assert stats.background_tokens > 0 and stats.finetune_tokens > 0
    assert stats.finetune_tokens + stats.background_tokens == trainer.tokens
    assert stats.slo_misses == 0  # 10 s per pass: nothing on this machine misses it
    assert coserver.model.points(FORWARD) > 0 and coserver.model.points(BACKWARD) > 0


def _scores(results: list[Any]) -> list[float]:
    return [x for r in results for x in getattr(r, "scores", getattr(r, "tokens", ()))]


def _wait(condition: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_pieces_fit_what_the_objective_leaves() -> None:
    model, params = _model()
    coserver = CoServer(_engine(model), slo_tpot_ms=10, headroom=1.0, token_budget=1024,
                        max_finetune_tokens=256, probe_tokens=16)
    trainer = Trainer(model, params, _data(1, length=200), lr=1e-3, epochs=1, batch_size=1,
                      seed=0)
    decode = StepTime("decode", rows=4, tokens=4, tokens_sq=4, context=80, seconds=0.00395)
    assert coserver.piece_size(trainer, decode)[0] == 16  # nothing measured: a probe
    for tokens in (8, 16, 32, 64):  # 1 ms + 0.1 ms per token
        coserver.model.add(FORWARD, tokens, tokens, 0.001 + 1e-4 * tokens)
    assert coserver.piece_size(trainer, decode)[0] == 50  # (10 - 3.95 - 1) ms / 0.1 ms
    assert coserver.piece_size(trainer, StepTime("decode", 4, 4, 4, 80, 0.0095))[0] == 0
    coserver.set_slo_tpot_ms(None)
    assert coserver.piece_size(trainer, decode) == (200, 1)  # the token rule alone
    prefill = StepTime("prefill", 4, 1000, 250_000, 1000, 0.004)
    assert coserver.piece_size(trainer, prefill)[0] == 24  # 1024 - 1000 tokens left
    coserver.close()


def test_a_tiny_objective_leaves_no_fine_tuning_and_counts_misses() -> None:
    model, params = _model()
    model.eval()
    coserver = CoServer(_engine(model), slo_tpot_ms=1e-6)
    trainer = Trainer(model, params, _data(2), lr=1e-3, epochs=1, batch_size=2, seed=0)
    with coserver.inference():
        job = coserver.submit(trainer)
        coserver.engine.run(_jobs())
        stats = coserver.stats()
    assert stats.iterations == 0 and stats.finetune_tokens == 0
    assert stats.slo_misses == stats.inference_passes > 0
    assert job.wait(60) and job.result() is trainer  # the background thread finished it
    assert coserver.stats().background_tokens == trainer.tokens == 24
    coserver.close()


def test_a_failing_run_reports_its_error_and_the_engine_goes_on(tmp_path: Any) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    model, params = _model()
    model.eval()
    coserver = CoServer(_engine(model))
    trainer = Trainer(model, params, _data(1), lr=1e-3, epochs=1, batch_size=1, seed=0,
                      checkpoint_dir=str(blocker / "sub"))
    job = coserver.submit(trainer)
    assert job.wait(60)
    with pytest.raises(ExecutionError, match="training failed"):
        job.result()
    assert isinstance(job.error, ExecutionError)
    assert len(coserver.run(_jobs())) == 4  # inference still answers
    coserver.close()


def test_one_co_server_per_engine_and_bad_options() -> None:
    model, _ = _model()
    engine = _engine(model)
    first = CoServer(engine)
    with pytest.raises(ConfigError, match="after_pass"):
        CoServer(engine)
    first.close()
    assert engine.after_pass is None
    for kwargs in ({"slo_tpot_ms": 0}, {"token_budget": 0}, {"headroom": 1.5},
                   {"probe_tokens": 0}, {"backward_layers": 0}):
        with pytest.raises(ConfigError):
            CoServer(engine, **kwargs)
    closed = CoServer(engine)
    closed.close()
    with pytest.raises(ExecutionError, match="closed"):
        closed.submit(Trainer(model, list(model.parameters())[:1], _data(1), lr=1e-3,
                              epochs=1, batch_size=1, seed=0))


def test_step_time_model_fits_lines_and_guards_few_points() -> None:
    model = StepTimeModel()
    assert model.predict("decode", 4, 100) is None and model.fit("decode") is None
    for rows, context in ((1, 10), (4, 50), (8, 80), (16, 400), (2, 300)):
        model.add("decode", rows, context, 0.002 + 0.0005 * rows + 1e-5 * context)
    fit = model.fit("decode")
    assert fit is not None and fit.points == 5
    assert (fit.a, fit.b, fit.c) == pytest.approx((0.002, 0.0005, 1e-5), rel=1e-6)
    assert model.predict("decode", 10, 1000) == pytest.approx(0.002 + 0.005 + 0.01)
    model.add(FORWARD, 32, 32, 0.0064)  # one point: proportional, 0.2 ms per token
    assert model.forward_tokens_within(0.0021, 0) == 10
    assert model.backward_layers_within(0.002, 100) is None
    model.add(BACKWARD, 100, 0, 0.0005)  # one layer of a 100-token sequence
    model.add(BACKWARD, 400, 0, 0.0011)  # four layers: 0.3 ms + 0.2 ms per layer
    assert model.backward_layers_within(0.00211, 100) == 9
    assert model.backward_layers_within(0.0002, 100) == 0
    noisy = StepTimeModel()
    for tokens, seconds in ((10, 0.004), (20, 0.003), (30, 0.002)):  # slower when smaller
        noisy.add("prefill", tokens, 0, seconds)
    fit = noisy.fit("prefill")
    assert fit is not None and fit.b > 0  # a negative slope is never used


def test_idle_pieces_fit_the_objective_too() -> None:
    """A query arriving while the background trains waits for one piece: with an objective
    the piece is what the fitted model says fits in it (at least a probe)."""
    model, params = _model()
    model.eval()
    coserver = CoServer(_engine(model), slo_tpot_ms=10.05, headroom=1.0, probe_tokens=16)
    for tokens in (8, 16, 32, 64):  # 1 ms + 0.1 ms per token: 90 tokens fit in 10.05 ms
        coserver.model.add(FORWARD, tokens, tokens, 0.001 + 1e-4 * tokens)
    trainer = Trainer(model, params, _data(1, length=200), lr=1e-3, epochs=1, batch_size=1,
                      seed=0, chunk_tokens=256)
    seen: list[int] = []
    job: Any = None

    @contextlib.contextmanager
    def record(on: bool) -> Iterator[None]:
        seen.append(trainer.forwarded_tokens)
        if len(seen) == 2:
            job.cancel()
        yield

    job = coserver.submit(trainer, activate=record)
    assert job.wait(60) and job.cancelled
    assert seen[:2] == [0, 90]
    coserver.close()


def test_unused_objective_time_of_a_run_is_spent_later() -> None:
    """The credit rule: a pass that leaves too little for a worthwhile piece (under
    probe_tokens) saves its leftover for later passes of the same run, up to ``burst``
    objectives; a new run starts from nothing; ``burst=0`` is the per-pass rule."""
    model, params = _model()
    trainer = Trainer(model, params, _data(1, length=200), lr=1e-3, epochs=1, batch_size=1,
                      seed=0)
    decode = StepTime("decode", 4, 4, 4, 80, 0.00802)  # leaves 2.03 ms of 10.05
    for burst, want in ((4.0, [0, 30, 200]), (0.0, [0, 0, 0])):
        engine = _engine(model)
        coserver = CoServer(engine, slo_tpot_ms=10.05, headroom=1.0, probe_tokens=16,
                            burst=burst)
        for tokens in (8, 16, 32, 64):  # 1 ms + 0.1 ms per token
            coserver.model.add(FORWARD, tokens, tokens, 0.001 + 1e-4 * tokens)
        got = []
        with coserver.inference():
            got.append(coserver.piece_size(trainer, decode)[0])  # 10 tokens fit: too few
            assert engine.after_pass is not None
            engine.after_pass(decode)  # no training submitted: the leftover is saved
            got.append(coserver.piece_size(trainer, decode)[0])  # 4.06 ms: 30 tokens
            for _ in range(40):
                engine.after_pass(decode)
            got.append(coserver.piece_size(trainer, decode)[0])  # capped: 40.2 ms
        assert got == want
        with coserver.inference():  # a new run earns its own credit
            assert coserver.piece_size(trainer, decode)[0] == 0
        coserver.close()
