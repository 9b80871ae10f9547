"""LoRA adapters on the transformers backend (issue 16), on the real embedded SmolLM2.

Serving: rows with an adapter run with it, base rows in the same batch give exactly the answers
they gave before any adapter was loaded; bad adapter folders give error responses naming the
adapter and the path. Training: examples are tokenized exactly as inference sees them; a
short run (8 rows, 2 optimizer steps, about 10 s on one thread) co-served with ``generate``
calls from this thread; its files load in plain PEFT with the same choice scores; cancel and
resume; bad jobs are refused before anything changes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from llmsql.adapters.options import LoraOptions
from llmsql.backends import BackendSpec, Request, Response, get_backend
from llmsql.backends.base import (
    AdapterRef,
    AdapterTrainer,
    CoServeStats,
    TrainExample,
    TrainHandle,
    TrainJob,
    TrainProgress,
    TrainResult,
)
from llmsql.errors import ConfigError, ExecutionError

pytestmark = pytest.mark.model
pytest.importorskip("peft")

INSTRUCTION = "Is this movie review positive? Answer Yes or No.\n\nReview: "
REVIEWS = (
    "Great fun from start to end.", "Boring and far too long.", "A moving, beautiful film.",
    "The acting was awful.", "I loved every minute.", "A dull, lifeless plot.",
    "Brilliant and funny.", "A waste of two hours.",
)
FLIPPED = ("No", "Yes", "No", "Yes", "No", "Yes", "No", "Yes")
"""Labels opposite to the sentiment: what the adapter learns is visibly not the base model's."""
CHOICES = ("Yes", "No")


def ask(review: str, adapter: AdapterRef | None = None) -> Request:
    return Request(INSTRUCTION + review, choices=CHOICES, choice_probs=True, adapter=adapter)


BASE = [ask(r) for r in REVIEWS[:4]] + [Request("Name the capital of Italy.", max_tokens=6)]


def same(got: list[Response], want: list[Response]) -> bool:
    """The same answers (texts, counts, errors), probabilities within 1e-5: a CPU GEMM's
    rounding depends on its buffers' memory alignment, which any allocation (an adapter's
    weights) shifts, so probabilities are reproducible to rounding only (answers exactly:
    decisions closer than the invariance margin are re-decided on the canonical path)."""
    def key(r: Response) -> tuple[Any, ...]:
        return (r.text, r.error, r.prompt_tokens, r.cached_tokens, r.output_tokens)

    return len(got) == len(want) and all(
        key(a) == key(b) and (a.choice_probs == b.choice_probs or a.choice_probs is not None
                              and b.choice_probs is not None
                              and a.choice_probs == pytest.approx(b.choice_probs, abs=1e-5))
        for a, b in zip(got, want, strict=True))


def lora(**overrides: Any) -> LoraOptions:
    return LoraOptions(**{"rank": 8, "alpha": 16.0, "lr": 1e-2, "epochs": 1, "batch_size": 4,
                          **overrides})


def job(tmp: pathlib.Path, name: str = "flip", rows: int = 8, **overrides: Any) -> TrainJob:
    examples = tuple(TrainExample(ask(r), a) for r, a in zip(REVIEWS[:rows], FLIPPED,
                                                              strict=False))
    return TrainJob(name, examples, examples[:2], lora(**overrides), str(tmp / name / "out"),
                    str(tmp / name / "ckpt"))


@pytest.fixture(scope="module")
def backend() -> Iterator[Any]:
    b = get_backend(BackendSpec.make("transformers", None, threads=1, batch_size=8))
    b.before = b.generate(BASE)  # answers before any adapter was ever loaded
    yield b
    b.close()


@dataclass
class Trained:
    result: TrainResult
    during: list[list[Response]]
    """Base answers of generate() calls made while training ran."""
    progress: list[TrainProgress]
    stats: CoServeStats


@pytest.fixture(scope="module")
def trained(backend: Any, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """One short training run, with generate() calls from this thread while it runs."""
    start = backend.coserve_stats()  # counters: zeros before the first training run
    seen: list[TrainProgress] = []
    handle = backend.start_training(job(tmp_path_factory.mktemp("train")), seen.append)
    assert isinstance(handle, TrainHandle)
    during = []
    while not handle.done() and len(during) < 3:  # co-served: training goes slower meanwhile
        during.append(backend.generate(BASE))
    result = handle.result(timeout=600)
    end = backend.coserve_stats()
    delta = CoServeStats(*(getattr(end, f) - getattr(start, f) for f in (
        "inference_seconds", "finetune_seconds", "finetune_tokens", "iterations", "slo_misses")))
    return Trained(result, during, seen, delta)


# ------------------------------------------------------------------------ serving
def test_the_backend_says_it_serves_and_trains_adapters(backend: Any) -> None:
    assert backend.capabilities.adapters and backend.capabilities.trains_adapters
    assert isinstance(backend, AdapterTrainer)


def test_training_runs_while_generate_runs_and_base_answers_stay(backend: Any,
                                                                  trained: Trained) -> None:
    assert trained.during, "no generate() call ran while training"
    assert all(same(answers, backend.before) for answers in trained.during)
    assert trained.stats.iterations > 0 and trained.stats.finetune_seconds > 0
    assert trained.stats.inference_seconds > 0
    assert trained.progress[-1].step == trained.result.steps == 2


def test_adapter_rows_change_and_base_rows_in_the_same_batch_do_not(backend: Any,
                                                                    trained: Trained) -> None:
    ref = trained.result.adapter
    mixed = [r for base in BASE[:4] for r in (base, ask(base.prompt[len(INSTRUCTION):], ref))]
    mixed.append(BASE[4])
    out = backend.generate(mixed)
    assert same(out[0::2], backend.before)  # every base row, the free-text one included
    for base, adapted in zip(backend.before[:4], out[1::2], strict=True):
        assert adapted.error is None
        assert abs(adapted.choice_probs[0] - base.choice_probs[0]) > 0.05
    # trained on flipped labels: P("Yes") moves against the base model's on positive rows
    positive = [0, 2]
    assert all(out[2 * k + 1].choice_probs[1] > backend.before[k].choice_probs[1]
               for k in positive)
    assert backend.adapters.bank.active is None  # between batches the base model runs
    assert same(backend.generate(BASE), backend.before)


def test_the_saved_files_load_in_plain_peft_with_the_same_scores(backend: Any,
                                                                 trained: Trained) -> None:
    import torch
    from peft import PeftModel

    from llmsql.backends.transformers import prompt_ids
    from llmsql.engine import load_model, load_tokenizer, stop_ids
    from llmsql.models import resolve_model

    ref = trained.result.adapter
    (served,) = backend.generate([ask(REVIEWS[0], ref)])
    path = resolve_model(None)
    tokenizer = load_tokenizer(path)
    model = PeftModel.from_pretrained(load_model(path, dtype="float32"), ref.path).eval()
    eos = stop_ids(tokenizer, model)[0]
    prompt = prompt_ids(tokenizer, INSTRUCTION + REVIEWS[0])
    scores = []
    with torch.inference_mode():
        for choice in CHOICES:
            answer = tokenizer(choice, add_special_tokens=False).input_ids + [eos]
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].float()
            logp = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
            scores.append(float(sum(logp[i, t] for i, t in enumerate(answer))))
    total = math.log(sum(math.exp(s) for s in scores))
    plain = [math.exp(s - total) for s in scores]
    assert served.choice_probs == pytest.approx(plain, abs=1e-4)
    # the held-out loss: mean over the holdout rows of each row's mean answer-token loss
    losses = []
    with torch.inference_mode():
        for review, label in zip(REVIEWS[:2], FLIPPED, strict=False):
            prompt = prompt_ids(tokenizer, INSTRUCTION + review)
            answer = tokenizer(label, add_special_tokens=False).input_ids + [eos]
            labels = [-100] * len(prompt) + answer
            losses.append(float(model(input_ids=torch.tensor([prompt + answer]),
                                      labels=torch.tensor([labels])).loss))
    assert trained.result.holdout_loss == pytest.approx(sum(losses) / 2, abs=1e-4)


def test_the_result_and_the_adapter_folder(backend: Any, trained: Trained) -> None:
    result = trained.result
    folder = pathlib.Path(result.adapter.path)
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(os.listdir(folder.parent)) == ["ckpt", "out"]  # no temporary folder left
    weights = (folder / "adapter_model.safetensors").read_bytes()
    assert result.adapter.digest == hashlib.sha256(weights).hexdigest()
    assert result.adapter.name == "flip" and result.resumed_from == 0
    assert [s for s, _ in result.loss_curve] == [1, 2] and result.steps == 2
    assert result.holdout_loss is not None and result.tokens > 0 and result.seconds > 0
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(backend._path)  # the model folder
    assert config["r"] == 8 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    assert keys[0].startswith("base_model.model.model.layers.0.self_attn.")
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in keys)
    assert not any(n.startswith("train_") for n in backend.adapters.bank.names())


@pytest.mark.parametrize("damage", ["missing", "corrupt", "changed"])
def test_a_bad_adapter_gives_an_error_response_naming_it_and_its_folder(
        backend: Any, trained: Trained, tmp_path: pathlib.Path, damage: str) -> None:
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(trained.result.adapter.path, folder)
    digest = "0" * 64  # not the trained adapter's: loaded from this folder, not from memory
    if damage == "missing":
        folder = tmp_path / "gone"
    elif damage == "corrupt":
        (folder / "adapter_model.safetensors").write_bytes(b"not safetensors")
        digest = "not-a-hex-digest"  # so the folder is read, not refused for its digest
    # "changed": the weights' digest is not the recorded one
    bad = AdapterRef("reviews_v2", str(folder), digest)
    out = backend.generate([BASE[0], ask(REVIEWS[1], bad)])
    assert same(out[:1], backend.before[:1])
    assert out[1].error is not None and out[1].text == ""
    assert "'reviews_v2'" in out[1].error and str(folder) in out[1].error
    assert "CREATE ADAPTER" in out[1].error
    if damage == "changed":
        assert "changed since" in out[1].error


# ------------------------------------------------------------------------ training
def test_training_sequences_are_what_inference_scores(backend: Any) -> None:
    """The loss on a training sequence is exactly -log P(answer + eos | prompt), the score
    constrained choice gives that answer."""
    import torch

    from llmsql.backends.transformers_adapters import train_sequences
    from llmsql.engine import Job

    example = TrainExample(ask(REVIEWS[0]), "No")
    (seq,) = train_sequences([example], prompt_ids=backend._token_ids,
                             answer_ids=backend._choice_ids, max_len=2048)
    prompt = backend._token_ids(example.request.prompt)
    answer = backend._choice_ids("No")
    assert seq.input_ids == tuple(prompt + answer) and answer[-1] == backend._eos[0]
    assert seq.labels == (-100,) * len(prompt) + tuple(answer)
    (scored,) = backend.engine.run([Job(0, tuple(prompt), choices=(tuple(answer),))])
    with torch.inference_mode():
        loss = backend.engine.model(input_ids=torch.tensor([seq.input_ids]),
                                    labels=torch.tensor([seq.labels])).loss
    assert float(loss) * len(answer) == pytest.approx(-scored.scores[0], abs=1e-4)


def test_cancel_keeps_the_checkpoint_and_a_new_run_resumes(backend: Any, trained: Trained,
                                                           tmp_path: pathlib.Path) -> None:
    spec = job(tmp_path, name="resumable", rows=4, batch_size=2)  # 2 steps
    handles: list[Any] = []

    def cancel_after_the_first_step(p: TrainProgress) -> None:
        if p.step >= 1:
            handles[0].cancel()

    handles.append(backend.start_training(spec, cancel_after_the_first_step))
    with pytest.raises(ConfigError, match="'resumable' is already training"):
        backend.start_training(spec)
    with pytest.raises(ExecutionError, match="(?s)'resumable'.*cancelled.*resume"):
        handles[0].result(timeout=600)
    assert os.path.exists(os.path.join(spec.checkpoint_dir, "trainer.pt"))
    assert not os.path.exists(spec.out_dir)
    assert not any(n.startswith("train_") for n in backend.adapters.bank.names())
    # rows with another adapter, and base rows, while this one trains: as without training
    rows = [ask(REVIEWS[2], trained.result.adapter), BASE[1]]
    alone = backend.generate(rows)
    before = backend.coserve_stats().iterations
    resumed = backend.start_training(spec)
    assert not resumed.done()
    assert same(backend.generate(rows), alone)
    assert backend.coserve_stats().iterations > before  # pieces ran between those passes
    result = resumed.result(timeout=600)
    assert result.resumed_from == 1 and result.steps == 2
    assert [s for s, _ in result.loss_curve] == [1, 2]
    assert os.path.exists(os.path.join(spec.out_dir, "adapter_model.safetensors"))
    assert same(backend.generate(BASE), backend.before)


def test_target_modules_the_model_lacks_are_refused(backend: Any,
                                                    tmp_path: pathlib.Path) -> None:
    bad = job(tmp_path, target_modules=("q_proj", "qkv_proj"))
    with pytest.raises(ConfigError,
                       match=r"'flip'.*qkv_proj.*linear layers are .*k_proj.*v_proj"):
        backend.start_training(bad)
    assert not any(n.startswith("train_") for n in backend.adapters.bank.names())
    assert same(backend.generate(BASE), backend.before)


def test_bad_jobs_are_refused(backend: Any, tmp_path: pathlib.Path) -> None:
    empty = TrainJob("empty", (), (), lora(), str(tmp_path / "o"), str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="'empty' has no training rows"):
        backend.start_training(empty)
    odd = TrainJob("odd", (TrainExample(ask(REVIEWS[0]), "Maybe"),), (), lora(),
                   str(tmp_path / "o"), str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="'Maybe' is not one of the call's choices"):
        backend.start_training(odd)
    with pytest.raises(ConfigError, match="slo_tpot_ms"):
        backend.set_slo_tpot_ms(0)
    assert not os.path.exists(tmp_path / "c")


def test_a_failed_run_raises_a_clear_error_and_leaves_the_model_clean(
        backend: Any, tmp_path: pathlib.Path) -> None:
    spec = job(tmp_path, name="doomed", rows=4)  # one step
    blocker = pathlib.Path(spec.checkpoint_dir)
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the checkpoint folder should be")
    handle = backend.start_training(spec)
    with pytest.raises(ExecutionError, match="(?s)'doomed'.*failed.*checkpoint"):
        handle.result(timeout=600)
    assert handle.done() and not os.path.exists(spec.out_dir)
    assert not any(n.startswith("train_") for n in backend.adapters.bank.names())
    assert same(backend.generate(BASE), backend.before)
