"""The client side of a worker: :class:`WorkerClient` and :func:`connect_or_start`.

A client attaches to the worker listening at the spec's socket path, or starts one with
``python -m llmsql.backends.worker`` (under a file lock, so that concurrent starters agree
on a single worker) and then *owns* it: closing the owner stops the worker. Each thread of
a client has its own connection, so concurrent batches reach the worker together.

This module never imports :mod:`.server`: it only names it in the command it spawns, and
both speak :mod:`.protocol`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, cast

from llmsql.backends.moe_glue import stats_sum
from llmsql.backends.worker.protocol import (
    CLOSE_GRACE_S,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_STARTUP_TIMEOUT,
    Call,
    Generated,
    Reply,
    WorkerInfo,
    WorkerStats,
    checkout_env,
    default_socket_path,
    file_lock,
    log_path,
    log_tail,
    recv,
    send,
    session_members,
    spawn_with_spec,
    spec_digest,
)
from llmsql.errors import BackendError, ConfigError, LLMSQLError, UnsupportedError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from llmsql.backends.base import BackendSpec, Capabilities, Request, Response
    from llmsql.moe.plan import OffloadStats

logger = logging.getLogger(__name__)

_WORKER_MODULE = "llmsql.backends.worker"
"""What the client runs with ``python -m`` (its ``__main__`` runs :mod:`.server`)."""


def _file_lock(path: str, timeout: float) -> contextlib.AbstractContextManager[None]:
    def fail() -> BackendError:
        msg = (
            f"timed out after {timeout:.0f} s waiting for the worker start lock {path}; "
            "another process is starting a worker (log: "
            f"{log_path(path.removesuffix('.lock') + '.sock')})"
        )
        return BackendError(msg, backend="worker")

    return file_lock(path, timeout, fail)


def _connect(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    return sock


def _alive(path: str) -> bool:
    sock = _connect(path)
    if sock is None:
        return False
    try:
        send(sock, Call("ping"))
        recv(sock)
    except (OSError, EOFError, ConnectionError):
        return False
    finally:
        sock.close()
    return True


def _spawn(spec: BackendSpec, path: str, idle_timeout: float) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", _WORKER_MODULE, "--socket", path,
        "--parent-pid", str(os.getpid()), "--idle-timeout", str(idle_timeout),
    ]  # fmt: skip
    return spawn_with_spec(cmd, spec, log_path(path), checkout_env())


def _wait_ready(proc: subprocess.Popen[bytes], path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _kill_session(proc.pid)
            msg = (
                f"the llmsql worker exited with code {proc.returncode} while starting; "
                f"its log {log_path(path)} ends with:\n{log_tail(log_path(path))}"
            )
            raise BackendError(msg, backend="worker")
        if os.path.exists(path) and _alive(path):
            return
        time.sleep(0.05)
    _kill_group(proc)
    msg = (
        f"the llmsql worker did not become ready within {timeout:.0f} s and was killed; "
        f"raise startup_timeout if the model is large. Its log {log_path(path)} ends "
        f"with:\n{log_tail(log_path(path))}"
    )
    raise BackendError(msg, backend="worker")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill the worker and every process left in its session (vLLM's engine processes).

    The worker leads its own session (``start_new_session``), so its session id is its pid;
    that id stays reserved while any member lives, so the scan cannot hit a stranger.
    """
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    _kill_session(proc.pid)


def _kill_session(sid: int) -> None:
    if not os.path.isdir("/proc/self"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(sid, signal.SIGKILL)
        return
    for pid in session_members(sid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _reap_when_dead(proc: subprocess.Popen[bytes]) -> None:
    """Owner-side thread: when the worker dies (even by SIGKILL), kill what it left."""
    proc.wait()
    _kill_session(proc.pid)


def _attach_or_start(
    spec: BackendSpec, path: str, startup_timeout: float, idle_timeout: float
) -> subprocess.Popen[bytes] | None:
    """Return the started worker process, or None when one was already serving ``path``."""
    if _alive(path):
        return None
    with _file_lock(path.removesuffix(".sock") + ".lock", startup_timeout):
        if _alive(path):
            return None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket of a worker that died
        logger.info("starting an llmsql %s worker at %s", spec.kind, path)
        proc = _spawn(spec, path, idle_timeout)
        _wait_ready(proc, path, startup_timeout)
        threading.Thread(target=_reap_when_dead, args=(proc,), daemon=True).start()
        return proc


def _shutdown(
    proc: subprocess.Popen[bytes] | None, owner_pid: int, path: str, conns: list[socket.socket]
) -> None:
    """Close a client's connections; if it owns the worker, stop the worker too.

    A forked child of the owner (which inherits this finalizer) never stops the worker.
    """
    for conn in conns:
        with contextlib.suppress(OSError):
            conn.close()
    conns.clear()
    if proc is None or os.getpid() != owner_pid or proc.poll() is not None:
        return  # a worker that died earlier was cleaned up by _reap_when_dead
    sock = _connect(path)
    if sock is not None:
        with contextlib.suppress(OSError, EOFError, ConnectionError), sock:
            send(sock, Call("shutdown"))
            recv(sock)
    try:
        proc.wait(timeout=CLOSE_GRACE_S)
    except subprocess.TimeoutExpired:
        logger.warning("the llmsql worker %d did not stop; killing it", proc.pid)
    _kill_group(proc)  # also reaps any engine process left in the worker's group


class _Held:
    """One thread's connection to the worker (a weakref-able holder)."""

    __slots__ = ("__weakref__", "conn")

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn


def _drop(conn: socket.socket, conns: list[socket.socket], lock: threading.Lock) -> None:
    with contextlib.suppress(OSError):
        conn.close()
    with lock, contextlib.suppress(ValueError):
        conns.remove(conn)


def _pick(given: float | None, option: object, default: float) -> float:
    if given is not None:
        return float(given)
    return default if option is None else float(option)  # type: ignore[arg-type]


class WorkerClient:
    """An :class:`LLMBackend` whose engine runs in an llmsql worker process.

    Constructing one attaches to the worker for ``spec`` or starts it (see
    :func:`connect_or_start`). A client is safe to share between threads: each thread
    gets its own connection, so concurrent batches reach the worker together and are
    merged. After ``fork`` the child opens fresh connections.
    """

    name: str
    capabilities: Capabilities

    def __init__(
        self,
        spec: BackendSpec,
        /,
        *,
        socket_path: str | None = None,
        startup_timeout: float | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        """Attach to the worker for ``spec``, starting it when none is running.

        Arguments left as None come from the spec's options of the same names, else from
        the defaults (the well-known path, :data:`DEFAULT_STARTUP_TIMEOUT`,
        :data:`DEFAULT_IDLE_TIMEOUT`).

        Raises:
            BackendError: the worker failed to start (the message holds its log tail).
        """
        self.spec = spec
        self.socket_path = str(
            socket_path or spec.option("socket_path") or default_socket_path(spec)
        )
        self.log_path = log_path(self.socket_path)
        startup = _pick(startup_timeout, spec.option("startup_timeout"), DEFAULT_STARTUP_TIMEOUT)
        idle = _pick(idle_timeout, spec.option("idle_timeout"), DEFAULT_IDLE_TIMEOUT)
        self._proc = _attach_or_start(spec, self.socket_path, startup, idle)
        self._conns: list[socket.socket] = []
        self._conns_lock = threading.Lock()
        self._local = threading.local()
        self._moe: OffloadStats | None = None
        self._moe_lock = threading.Lock()
        self._pid = self._owner_pid = os.getpid()
        self._finalizer = weakref.finalize(
            self, _shutdown, self._proc, self._owner_pid, self.socket_path, self._conns
        )
        try:
            self.info = cast("WorkerInfo", self._call("hello"))
        except BaseException:
            self.close()
            raise
        if self.info.spec_digest != spec_digest(spec):
            self.close()
            msg = (
                f"the worker at {self.socket_path} serves another spec; pass a different "
                "socket_path or leave it unset"
            )
            raise BackendError(msg, backend=spec.kind)
        self.name = self.info.name
        self.capabilities = self.info.capabilities

    @property
    def owner(self) -> bool:
        """Whether this client started the worker (closing it then stops the worker)."""
        return self._proc is not None and os.getpid() == self._owner_pid

    @property
    def worker_pid(self) -> int:
        """Return the worker's process id."""
        return self.info.pid

    def generate(self, batch: Sequence[Request], /) -> list[Response]:
        """Return exactly one Response per Request, in input order."""
        if not batch:
            return []
        reply = cast("Generated", self._call("generate", list(batch)))
        out = reply.responses
        if len(out) != len(batch):
            msg = f"worker returned {len(out)} responses for {len(batch)} requests"
            raise BackendError(msg, backend=self.spec.kind)
        if reply.moe is not None:
            with self._moe_lock:
                self._moe = stats_sum([self._moe, reply.moe] if self._moe else [reply.moe])
        return out

    def moe_stats(self) -> OffloadStats | None:
        """What the worker's expert offload measured for this client's ``generate`` calls
        (their replies' counters, summed; :meth:`stats` has the whole worker's). None: no
        reply has carried any yet (the engine does not offload, or nothing was generated).
        """
        with self._moe_lock:
            return self._moe

    def count_tokens(self, text: str, /) -> int:
        """Return the tokens of ``text`` as the model sees it (chat template included)."""
        return cast("int", self._call("count_tokens", text))

    def model_id(self) -> str:
        """Return the engine's model identity."""
        return self.info.model_id

    def stats(self) -> WorkerStats:
        """Return the worker's counters (shared by every client of the worker)."""
        return cast("WorkerStats", self._call("stats"))

    def admin(self, name: str, /, *args: object) -> object:
        """Call an engine method of :data:`.protocol.ADMIN_CALLS`, e.g. ``reset_prefix_cache``.

        Raises:
            UnsupportedError: the engine has no such admin call.
        """
        return self._call("admin", name, *args)

    def close(self) -> None:
        """Disconnect; the owner also shuts the worker down (idempotent)."""
        self._finalizer()

    def __enter__(self) -> WorkerClient:  # noqa: D105
        return self

    def __exit__(self, *exc: object) -> None:  # noqa: D105
        self.close()

    def _conn(self) -> socket.socket:
        if not self._finalizer.alive:
            msg = "this backend is closed; build a new one"
            raise BackendError(msg, backend=self.spec.kind)
        if os.getpid() != self._pid:  # forked: never share the parent's sockets
            self._pid, self._local = os.getpid(), threading.local()
            self._conns.clear()
        held: _Held | None = getattr(self._local, "held", None)
        if held is None:
            conn = _connect(self.socket_path)
            if conn is None:
                raise self._lost("cannot connect")  # noqa: EM101 - _lost builds the message
            held = self._local.held = _Held(conn)
            with self._conns_lock:
                self._conns.append(conn)
            # the thread-local dies with its thread: close that thread's connection then
            weakref.finalize(held, _drop, conn, self._conns, self._conns_lock)
        return held.conn

    def _call(self, op: str, *args: object) -> object:
        conn = self._conn()
        try:
            send(conn, Call(op, args))
            reply = cast("Reply", recv(conn))
        except (OSError, EOFError, ConnectionError) as exc:
            self._local.held = None  # its finalizer closes the socket
            raise self._lost(str(exc)) from exc
        except BaseException:
            # e.g. Ctrl-C while waiting: the reply would arrive later on this connection
            # and answer the next call, so this connection must never be used again.
            self._local.held = None
            raise
        if reply.error is not None:
            raise self._remote_error(op, reply)
        return reply.value

    def _lost(self, why: str) -> BackendError:
        return BackendError(
            f"lost the llmsql worker at {self.socket_path} ({why}); it may have crashed or "
            f"been shut down by its owner. Its log {self.log_path} ends with:\n"
            f"{log_tail(self.log_path)}",
            backend=self.spec.kind,
        )

    def _remote_error(self, op: str, reply: Reply) -> LLMSQLError:
        msg = f"{reply.error_type}: {reply.error} (in the worker's {op}; log: {self.log_path})"
        if reply.error_type == "ConfigError":
            return ConfigError(msg)
        if reply.error_type == "UnsupportedError":
            return UnsupportedError(msg)
        return BackendError(msg, backend=self.spec.kind)


def connect_or_start(
    spec: BackendSpec,
    /,
    *,
    socket_path: str | None = None,
    startup_timeout: float | None = None,
    idle_timeout: float | None = None,
) -> WorkerClient:
    """Attach to the running worker for ``spec``, or start one and own it.

    Args:
        spec: What the worker hosts; its digest names the well-known socket path.
        socket_path: Use this socket path instead of the well-known one (default: the
            spec's ``socket_path`` option, else :func:`default_socket_path`).
        startup_timeout: Seconds to wait for a starting worker, model load included
            (default: the spec's option, else 600).
        idle_timeout: A started worker exits after this many seconds without any
            connected client; 0 disables (default: the spec's option, else 600).

    Returns:
        A client; ``client.owner`` tells whether it started (and will stop) the worker.

    Raises:
        BackendError: the worker failed to start; the message holds its log tail.
    """
    return WorkerClient(
        spec, socket_path=socket_path, startup_timeout=startup_timeout, idle_timeout=idle_timeout
    )
