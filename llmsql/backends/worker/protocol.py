"""What both sides of the worker socket share: messages, framing, paths and the start lock.

The wire format is a length-prefixed pickle of :class:`Call` / :class:`Reply`. Pickles name
their classes by module, so every message class lives here (never in ``__main__``): the
worker (:mod:`.server`) and its clients (:mod:`.client`) unpickle the same names.

The paths are per user and per spec: :func:`default_socket_path` is
``<tmp>/llmsql-<uid>/w-<digest>.sock`` in the private folder :func:`private_dir`, with the
worker's log (:func:`log_path`) and start lock beside it. :func:`spec_digest` includes
:data:`PROTOCOL_VERSION`, so workers speaking another version never share a socket.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmsql.errors import BackendError

if TYPE_CHECKING:
    import socket
    from collections.abc import Callable, Iterator

    from llmsql.backends.base import BackendSpec, Capabilities, Response
    from llmsql.moe.plan import OffloadStats

PROTOCOL_VERSION = 4
"""Version of the wire format; 2 since the message classes moved to this module, 3 since a
``generate`` reply is a :class:`Generated` (with its expert offload counters), 4 since a
:class:`~llmsql.backends.base.Request` carries its LoRA ``adapter`` (an older worker would
unpickle it without, and answer with the base model)."""

ADMIN_CALLS: frozenset[str] = frozenset({"metrics", "reset_prefix_cache"})
"""Engine methods that clients may call through :meth:`.client.WorkerClient.admin`."""

CLIENT_OPTIONS: frozenset[str] = frozenset({"socket_path", "startup_timeout", "idle_timeout"})
"""Spec options that configure the client side only; they are not part of the identity."""

DEFAULT_STARTUP_TIMEOUT = 600.0
DEFAULT_IDLE_TIMEOUT = 600.0
CLOSE_GRACE_S = 60.0
"""Seconds a closing worker (or an owner waiting for it) waits before killing."""

_HEADER = struct.Struct("!Q")
_LOG_TAIL_CHARS = 3000


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What a worker tells a client on ``hello``."""

    pid: int
    protocol: int
    spec_digest: str
    name: str
    model_id: str
    capabilities: Capabilities
    log_path: str


@dataclass(frozen=True, slots=True)
class WorkerStats:
    """Counters of one worker since it started."""

    model_loads: int
    """Engines built by this worker (always 1: a worker hosts one engine)."""
    requests: int
    """Requests generated."""
    client_batches: int
    """``generate`` calls received from clients."""
    engine_batches: int
    """Calls into the engine; fewer than ``client_batches`` when batches were merged."""
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    engine_seconds: float
    """Wall time spent inside the engine's ``generate``."""
    connections: int
    """Connections open now: one per (client, thread) that has called the worker."""
    pid: int
    uptime_s: float
    moe: OffloadStats | None = None
    """What the engine's expert offload measured since the model loaded (None: the engine
    does not offload experts)."""


@dataclass(frozen=True, slots=True)
class Generated:
    """The value of a ``generate`` reply: the responses, in request order, and what expert
    offload measured while they ran.

    Several clients' batches may run as one engine batch: its counters are then shared out
    among them by their requests (:func:`llmsql.backends.moe_glue.stats_split`), so the
    replies' counters add up to the worker's (:attr:`WorkerStats.moe`).
    """

    responses: list[Response]
    moe: OffloadStats | None = None
    """This batch's share of the offload counters (None: the engine does not offload)."""


@dataclass(frozen=True, slots=True)
class Call:
    """A client's request: ``op`` (hello, ping, stats, generate, ...) and its arguments."""

    op: str
    args: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class Reply:
    """The worker's answer to one :class:`Call`: a value, or an error and its type's name."""

    value: Any = None
    error: str | None = None
    error_type: str = ""


# --------------------------------------------------------------------------- framing


def send(sock: socket.socket, obj: object) -> None:
    """Send one message: its pickle's length, then the pickle."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(data)) + data)


def recv(sock: socket.socket) -> object:
    """Receive one message sent by :func:`send`.

    Raises:
        ConnectionError: the peer closed the connection.
    """
    (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    return pickle.loads(_recv_exact(sock, size))  # noqa: S301 - peer is this user's llmsql


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            msg = "the peer closed the connection"
            raise ConnectionError(msg)
        got += n
    return bytes(buf)


# --------------------------------------------------------------------------- paths


def spec_digest(spec: BackendSpec, /) -> str:
    """Return a short stable digest of ``spec`` (client options excluded) and the environment.

    The environment is ``sys.prefix`` (the virtualenv or installation), so that ``python``
    and ``python3`` of one environment (e.g. a driver and its Spark executors) share a
    worker while two environments with different llmsql or vLLM versions do not.

    >>> from llmsql.backends.base import BackendSpec
    >>> spec_digest(BackendSpec.make("vllm")) == spec_digest(BackendSpec.make("vllm"))
    True
    >>> len(spec_digest(BackendSpec.make("vllm", max_model_len=512)))
    16
    """
    options = tuple((k, v) for k, v in spec.options if k not in CLIENT_OPTIONS)
    identity = repr((PROTOCOL_VERSION, spec.kind, spec.model, options, sys.prefix))
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def private_dir() -> pathlib.Path:
    """Return the user's private folder for worker sockets, locks and logs (mode 0700).

    Raises:
        BackendError: the folder exists but belongs to another user or is open to others.
    """
    base = pathlib.Path(tempfile.gettempdir())
    if len(str(base)) > 60:  # Unix socket paths are limited to about 108 bytes
        base = pathlib.Path("/tmp")
    path = base / f"llmsql-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        msg = (
            f"worker folder {path} is not private (owner uid {st.st_uid}, mode "
            f"{oct(st.st_mode & 0o777)}); remove it or run: chmod 700 {path}"
        )
        raise BackendError(msg, backend="worker")
    return path


def default_socket_path(spec: BackendSpec, /) -> str:
    """Return the well-known socket path of the worker for ``spec`` (per user, per spec)."""
    return str(private_dir() / f"w-{spec_digest(spec)}.sock")


def log_path(socket_path: str, /) -> str:
    """Return the log file of the worker listening at ``socket_path``.

    >>> log_path("/tmp/llmsql-1/w-0123.sock")
    '/tmp/llmsql-1/w-0123.log'
    """
    return socket_path.removesuffix(".sock") + ".log"


def log_tail(path: str, /) -> str:
    """Return the last few thousand characters of the log at ``path`` (``(no log)`` if none)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _LOG_TAIL_CHARS))
            return f.read().decode(errors="replace")
    except OSError:
        return "(no log)"


def checkout_env() -> dict[str, str]:
    """This process's environment, plus (when llmsql runs from a source checkout) the folder
    holding this ``llmsql`` first on ``PYTHONPATH``, so that a process started with it runs
    the same code.
    """
    env = dict(os.environ)
    package_root = pathlib.Path(__file__).resolve().parents[3]  # above llmsql/backends/worker/
    if package_root.name not in ("site-packages", "dist-packages"):  # a source checkout
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(package_root), env.get("PYTHONPATH")) if p
        )
    return env


def spawn_with_spec(cmd: list[str], spec: BackendSpec, log: str,
                    env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``cmd`` (one of llmsql's own ``python -m`` processes) in a session of its own,
    its output in the file ``log`` (mode 0600), and hand it ``spec`` pickled on stdin.
    """
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        proc = subprocess.Popen(  # noqa: S603 - our own module, fixed arguments
            cmd, stdin=subprocess.PIPE, stdout=log_fd, stderr=subprocess.STDOUT, env=env,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
    finally:
        os.close(log_fd)
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.write(pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL))
        proc.stdin.close()
    return proc


@contextlib.contextmanager
def file_lock(path: str, timeout: float, fail: Callable[[], Exception]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created 0600) while the block runs.

    Raises:
        Exception: ``fail()``, after ``timeout`` seconds of waiting for the lock.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise fail() from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


# --------------------------------------------------------------------------- processes


def session_members(sid: int, /) -> list[int]:
    """Pids of the processes in session ``sid`` (Linux ``/proc``; empty elsewhere).

    The worker leads its own session, so both its owner and the worker itself find the
    engine processes the worker started here.
    """
    if not os.path.isdir("/proc/self"):
        return []
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state ppid pgrp session ...
        if int(fields[3]) == sid:
            members.append(int(entry.name))
    return members
