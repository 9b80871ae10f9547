"""The worker package's split: protocol, server and client meet only through the protocol.

These tests need no model: the server hosts the dry-run engine in this process (a thread),
and a real :class:`WorkerClient` attaches to it over a real Unix socket. The tests that start
worker processes with a real engine are in ``test_vllm.py`` (the ``model`` ones).
"""

from __future__ import annotations

import ast
import os
import pickle
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import llmsql
import llmsql.backends.worker as worker_package
from llmsql.backends import BackendSpec, Request
from llmsql.backends.dry_run import DryRunBackend
from llmsql.backends.worker import WorkerClient, connect_or_start, protocol, spec_digest
from llmsql.backends.worker import client as client_module
from llmsql.backends.worker import server as server_module
from llmsql.backends.worker.protocol import (
    PROTOCOL_VERSION,
    Call,
    Reply,
    WorkerInfo,
    log_path,
    recv,
    send,
)
from llmsql.errors import BackendError, UnsupportedError

PACKAGE_DIR = Path(worker_package.__file__).parent


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[BackendSpec, str]]:
    """A worker server hosting the dry-run engine on a socket, run by a thread of this process."""
    spec = BackendSpec.make("dry-run", "m")
    path = str(tmp_path / "w.sock")
    engine = DryRunBackend(spec)
    info = WorkerInfo(
        pid=0, protocol=PROTOCOL_VERSION, spec_digest=spec_digest(spec), name=engine.name,
        model_id=engine.model_id(), capabilities=engine.capabilities, log_path=log_path(path),
    )  # fmt: skip
    stop = threading.Event()
    listener = server_module._listen(path)
    thread = threading.Thread(
        target=server_module._Server(engine, info, stop).serve, args=(listener,), daemon=True
    )
    thread.start()
    try:
        yield spec, path
    finally:
        stop.set()
        thread.join(timeout=10)
        listener.close()
    assert not thread.is_alive()


def test_a_client_attaches_to_a_running_server(served: tuple[BackendSpec, str]) -> None:
    spec, path = served
    with connect_or_start(spec, socket_path=path) as client:
        assert not client.owner  # it attached: nothing was started
        assert (client.name, client.model_id()) == ("dry-run", "dry-run:m")
        out = client.generate([Request("a", choices=("yes", "no")), Request("b" * 40)])
        assert [r.text for r in out] == ["yes", ""]
        assert client.count_tokens("x" * 40) == DryRunBackend().count_tokens("x" * 40)
        stats = client.stats()
        assert (stats.requests, stats.client_batches, stats.connections) == (2, 1, 1)
        with pytest.raises(UnsupportedError, match="reset_prefix_cache.*dry-run engine"):
            client.admin("reset_prefix_cache")  # the error keeps its type across the socket
    with pytest.raises(BackendError, match="closed"):
        client.stats()


def test_a_client_refuses_a_server_of_another_spec(served: tuple[BackendSpec, str]) -> None:
    _, path = served
    with pytest.raises(BackendError, match="serves another spec"):
        WorkerClient(BackendSpec.make("dry-run", "other"), socket_path=path)


def test_messages_are_framed_and_pickled_by_the_protocol_module() -> None:
    a, b = socket.socketpair()
    with a, b:
        send(a, Call("generate", ([Request("p")],)))
        send(a, Reply(error="boom", error_type="BackendError"))
        assert recv(b) == Call("generate", ([Request("p")],))
        assert recv(b) == Reply(error="boom", error_type="BackendError")
        a.close()
        with pytest.raises(ConnectionError, match="closed"):
            recv(b)
    # both processes unpickle these names, so they must never be __main__'s
    assert b"llmsql.backends.worker.protocol" in pickle.dumps(Call("ping"))


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize(("module", "other"), [("server", "client"), ("client", "server")])
def test_server_and_client_never_import_each_other(module: str, other: str) -> None:
    imported = _imported_modules(PACKAGE_DIR / f"{module}.py")
    assert "llmsql.backends.worker.protocol" in imported
    assert f"llmsql.backends.worker.{other}" not in imported
    if module == "client":  # at run time too: a client process never loads the server
        code = (
            "import sys, llmsql.backends.worker as w; w.connect_or_start; "
            "sys.exit('llmsql.backends.worker.server' in sys.modules)"
        )
        assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_python_m_runs_the_server() -> None:
    out = subprocess.run(
        [sys.executable, "-m", client_module._WORKER_MODULE, "--help"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert out.stdout.startswith("usage: python -m llmsql.backends.worker")
    assert "--parent-pid" in out.stdout
    assert "pickled BackendSpec" in out.stdout


def test_a_spawned_worker_runs_this_checkout(tmp_path: Path) -> None:
    env = protocol.checkout_env()
    if "site-packages" in Path(llmsql.__file__).parts:
        pytest.skip("llmsql is installed, not run from a source checkout")
    first = env["PYTHONPATH"].split(os.pathsep)[0]
    assert Path(first, "llmsql", "__init__.py").resolve() == Path(llmsql.__file__).resolve()
    code = "import llmsql.backends.worker.server as s; print(s.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
        check=True, timeout=60,
    )  # fmt: skip
    assert Path(out.stdout.strip()).resolve() == Path(server_module.__file__).resolve()
