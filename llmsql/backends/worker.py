"""A local inference worker process owned by llmsql, and the client that talks to it.

The worker hosts exactly one engine, built from a picklable :class:`BackendSpec`, and serves
generate / count_tokens / stats / admin calls over a Unix domain socket. Several clients
(threads of one process, or several processes such as Spark executors) can use one worker
at once; their batches are merged into the engine, so they share one model load and one
prefix KV cache.

Lifecycle:

- :func:`connect_or_start` (or constructing :class:`WorkerClient`) attaches to the worker
  listening at the spec's well-known path (``<tmp>/llmsql-<uid>/w-<digest>.sock``), or starts
  one with ``python -m llmsql.backends.worker``. A file lock makes concurrent starters agree
  on a single worker; the others attach to it.
- The client that started the worker *owns* it: ``close()`` (or garbage collection, or
  interpreter exit) shuts the worker down. Attached clients only disconnect.
- The worker also exits when its owner process dies (``--parent-pid`` watchdog), and when
  no client has been connected for ``idle_timeout`` seconds.
- Everything the worker (and the engine's own processes) print goes to a log file next to
  the socket; error messages name it.

The wire format is a length-prefixed pickle of :class:`_Call` / :class:`_Reply`. It is only
spoken between llmsql's own processes of one user: the socket lives in a private (0700)
directory, is created with mode 0600, and the worker rejects peers of another uid.

This module is over the 500-line guideline because client and server share the framing,
the paths and the message types; splitting them would only add cross-module privates.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib
import logging
import os
import pathlib
import pickle
import queue
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from llmsql.backends.base import BackendSpec, Capabilities, LLMBackend, Request, Response
from llmsql.errors import BackendError, ConfigError, LLMSQLError, UnsupportedError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1

ENGINES: dict[str, str] = {
    "vllm": "llmsql.backends.vllm:VLLMEngine",
}
"""Kinds whose in-worker engine differs from the registered backend (which is a client).

Any other kind is built inside the worker with :func:`llmsql.backends.get_backend`.
"""

ADMIN_CALLS: frozenset[str] = frozenset({"metrics", "reset_prefix_cache"})
"""Engine methods that clients may call through :meth:`WorkerClient.admin`."""

CLIENT_OPTIONS: frozenset[str] = frozenset({"socket_path", "startup_timeout", "idle_timeout"})
"""Spec options that configure the client side only; they are not part of the identity."""

DEFAULT_STARTUP_TIMEOUT = 600.0
DEFAULT_IDLE_TIMEOUT = 600.0
_MAX_MERGED_REQUESTS = 8192
_HEADER = struct.Struct("!Q")
_POLL_S = 0.2
_CLOSE_GRACE_S = 60.0
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


@dataclass(frozen=True, slots=True)
class _Call:
    op: str
    args: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class _Reply:
    value: Any = None
    error: str | None = None
    error_type: str = ""


# --------------------------------------------------------------------------- framing


def _send(sock: socket.socket, obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv(sock: socket.socket) -> object:
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


def _log_path(socket_path: str) -> str:
    return socket_path.removesuffix(".sock") + ".log"


def _log_tail(log_path: str) -> str:
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _LOG_TAIL_CHARS))
            return f.read().decode(errors="replace")
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------- engine side


def build_engine(spec: BackendSpec, /) -> LLMBackend:
    """Build the in-process engine for ``spec`` (what a worker hosts).

    Client-only options (:data:`CLIENT_OPTIONS`) are removed first: engines reject
    options they do not know.
    """
    options = tuple((k, v) for k, v in spec.options if k not in CLIENT_OPTIONS)
    spec = BackendSpec(spec.kind, spec.model, options)
    target = ENGINES.get(spec.kind)
    if target is None:
        from llmsql.backends import get_backend

        return get_backend(spec)
    module_name, cls_name = target.split(":")
    engine: LLMBackend = getattr(importlib.import_module(module_name), cls_name)(spec)
    return engine


@dataclass(slots=True)
class _Job:
    op: str
    args: tuple[Any, ...]
    future: Future[Any] = field(default_factory=Future)


@dataclass(slots=True)
class _Counters:
    requests: int = 0
    client_batches: int = 0
    engine_batches: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    engine_seconds: float = 0.0
    connections: int = 0
    last_seen: float = field(default_factory=time.monotonic)


class _Server:
    """Serves one engine: an accept thread, one thread per connection, the engine loop.

    The engine is only ever called from the main thread (:meth:`serve`), which takes jobs
    from one queue and merges consecutive ``generate`` jobs into one engine batch.
    """

    def __init__(self, engine: LLMBackend, info: WorkerInfo, stop: threading.Event) -> None:
        self._engine = engine
        self._info = info
        self._stop = stop
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._lock = threading.Lock()
        self._counters = _Counters()
        self._conns: set[socket.socket] = set()
        self._started = time.monotonic()

    # -- engine loop (main thread)
    def serve(self, listener: socket.socket) -> None:
        threading.Thread(target=self._accept_loop, args=(listener,), daemon=True).start()
        pending: deque[_Job] = deque()
        while not self._stop.is_set():
            if not pending:
                try:
                    pending.append(self._jobs.get(timeout=_POLL_S))
                except queue.Empty:
                    continue
            job = pending.popleft()
            if job.op == "generate":
                self._run_generate(self._merge(job, pending))
            else:
                self._run_one(job)
        self._fail_all([*pending, *self._drain()], "the worker is shutting down")
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def _merge(self, first: _Job, pending: deque[_Job]) -> list[_Job]:
        group, total = [first], len(first.args[0])
        while total < _MAX_MERGED_REQUESTS:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job.op != "generate":
                pending.append(job)
                break
            group.append(job)
            total += len(job.args[0])
        return group

    def _run_generate(self, group: list[_Job]) -> None:
        """Run merged client batches as one engine batch.

        If that fails, each client batch is retried alone, so one client's failing batch
        cannot fail the others merged with it.
        """
        batch = [r for job in group for r in job.args[0]]
        try:
            started = time.perf_counter()
            out = self._engine.generate(batch)
            with self._lock:
                self._counters.engine_seconds += time.perf_counter() - started
            if len(out) != len(batch):
                msg = f"engine returned {len(out)} responses for {len(batch)} requests"
                raise BackendError(msg, backend=self._info.name)
        except Exception as exc:  # boundary: the error goes back to the waiting client
            if len(group) > 1:
                for job in group:
                    self._run_generate([job])
                return
            logger.exception("generate failed")
            group[0].future.set_exception(exc)
            return
        self._count(group, out)
        start = 0
        for job in group:
            n = len(job.args[0])
            job.future.set_result(out[start : start + n])
            start += n

    def _count(self, group: list[_Job], out: list[Response]) -> None:
        with self._lock:
            c = self._counters
            c.requests += len(out)
            c.client_batches += len(group)
            c.engine_batches += 1
            c.prompt_tokens += sum(r.prompt_tokens for r in out if r.error is None)
            c.cached_tokens += sum(r.cached_tokens for r in out if r.error is None)
            c.output_tokens += sum(r.output_tokens for r in out)

    def _run_one(self, job: _Job) -> None:
        try:
            if job.op == "count_tokens":
                job.future.set_result(self._engine.count_tokens(job.args[0]))
            elif job.op == "admin":
                job.future.set_result(self._admin(job.args[0], job.args[1:]))
            else:
                msg = f"unknown engine call {job.op!r}"
                raise BackendError(msg, backend="worker")
        except Exception as exc:  # boundary: reported to the caller
            job.future.set_exception(exc)

    def _admin(self, name: str, args: tuple[object, ...]) -> object:
        method = getattr(self._engine, name, None) if name in ADMIN_CALLS else None
        if method is None:
            msg = (
                f"admin call {name!r} is not supported by the {self._info.name} engine "
                f"(admin calls: {', '.join(sorted(ADMIN_CALLS))})"
            )
            raise UnsupportedError(msg)
        return cast("object", method(*args))

    def _drain(self) -> list[_Job]:
        jobs = []
        with contextlib.suppress(queue.Empty):
            while True:
                jobs.append(self._jobs.get_nowait())
        return jobs

    @staticmethod
    def _fail_all(jobs: list[_Job], why: str) -> None:
        for job in jobs:
            job.future.set_exception(BackendError(why, backend="worker"))

    # -- connections (threads)
    def _accept_loop(self, listener: socket.socket) -> None:
        listener.settimeout(_POLL_S)
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            if not _same_user(conn):
                conn.close()
                continue
            conn.settimeout(None)
            threading.Thread(target=self._serve_conn, args=(conn,), daemon=True).start()

    def _serve_conn(self, conn: socket.socket) -> None:
        self._track(conn, +1)
        try:
            while not self._stop.is_set():
                call = cast("_Call", _recv(conn))
                _send(conn, self._dispatch(call))
                if call.op == "shutdown":
                    logger.info("shutdown requested by a client")
                    self._stop.set()
        except (OSError, EOFError, ConnectionError):
            pass
        finally:
            self._track(conn, -1)
            conn.close()

    def _track(self, conn: socket.socket, delta: int) -> None:
        with self._lock:
            self._counters.connections += delta
            self._counters.last_seen = time.monotonic()
            (self._conns.add if delta > 0 else self._conns.discard)(conn)

    def _dispatch(self, call: _Call) -> _Reply:
        try:
            return _Reply(value=self._answer(call))
        except Exception as exc:  # boundary: errors travel back to the client
            return _Reply(error=str(exc) or repr(exc), error_type=type(exc).__name__)

    def _answer(self, call: _Call) -> object:
        if call.op == "hello":
            return self._info
        if call.op == "stats":
            return self.stats()
        if call.op in ("ping", "shutdown"):
            return None
        if call.op not in ("generate", "count_tokens", "admin"):
            msg = f"unknown worker call {call.op!r}"
            raise BackendError(msg, backend="worker")
        job = _Job(call.op, call.args)
        self._jobs.put(job)
        return job.future.result()

    def stats(self) -> WorkerStats:
        """Snapshot of the counters."""
        with self._lock:
            c = self._counters
            return WorkerStats(
                model_loads=1, requests=c.requests, client_batches=c.client_batches,
                engine_batches=c.engine_batches, prompt_tokens=c.prompt_tokens,
                cached_tokens=c.cached_tokens, output_tokens=c.output_tokens,
                engine_seconds=c.engine_seconds, connections=c.connections, pid=os.getpid(),
                uptime_s=time.monotonic() - self._started,
            )  # fmt: skip

    def idle_for(self) -> float:
        """Seconds since the last client disconnected (0 while any is connected)."""
        with self._lock:
            if self._counters.connections:
                return 0.0
            return time.monotonic() - self._counters.last_seen


def _same_user(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return bool(uid == os.getuid())


def _parent_alive(parent_pid: int) -> bool:
    """Tell whether the owner lives.

    The owner started this worker, so it is our parent until it dies (then we are
    reparented): comparing ``getppid`` is immune to pid reuse.
    """
    return parent_pid <= 0 or os.getppid() == parent_pid


def _watchdog(
    stop: threading.Event, parent_pid: int, idle_timeout: float, server: list[_Server]
) -> None:
    """Stop the worker when its owner dies or it has been idle too long."""
    while not stop.wait(0.5):
        if not _parent_alive(parent_pid):
            logger.info("owner process %d is gone; exiting", parent_pid)
            if not server:  # still loading the engine: nothing to shut down cleanly
                _exit_now(2)
            stop.set()
        elif server and idle_timeout > 0 and server[0].idle_for() > idle_timeout:
            logger.info("no client for %.0f s; exiting", idle_timeout)
            stop.set()


def _listen(path: str) -> socket.socket:
    """Bind under a temporary name, then rename: clients only ever see a ready socket."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(tmp)
    os.chmod(tmp, 0o600)
    listener.listen(128)
    os.rename(tmp, path)
    return listener


def _unlink_if_ours(path: str, inode: int) -> None:
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == inode:
            os.unlink(path)


def _session_members(sid: int) -> list[int]:
    """Pids of the processes in session ``sid`` (Linux ``/proc``; empty elsewhere)."""
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


def _exit_now(code: int) -> None:
    """Exit at once, killing the engine processes this worker's session holds."""
    for pid in _session_members(os.getpid()):
        if pid != os.getpid():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    logging.shutdown()
    os._exit(code)


def _close_engine(engine: LLMBackend) -> None:
    timer = threading.Timer(_CLOSE_GRACE_S, _exit_now, args=(3,))  # never hang on exit
    timer.daemon = True
    timer.start()
    try:
        engine.close()
    except Exception:  # boundary: log and exit anyway
        logger.exception("closing the engine failed")
    timer.cancel()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llmsql.backends.worker",
        description="llmsql inference worker (reads a pickled BackendSpec on stdin)",
    )
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on")
    parser.add_argument("--parent-pid", type=int, default=0, help="exit when it dies")
    parser.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Worker process entry point: build the engine, then serve until told to stop."""
    args = _parse_args(argv)
    os.umask(0o077)
    # The worker is its own program whose stderr is its log file: configuring logging
    # here is not library code configuring a user's process.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    spec: BackendSpec = pickle.load(sys.stdin.buffer)  # noqa: S301 - from our own parent
    stop = threading.Event()
    holder: list[_Server] = []
    threading.Thread(
        target=_watchdog, args=(stop, args.parent_pid, args.idle_timeout, holder), daemon=True
    ).start()
    logger.info("building %s engine for model %r", spec.kind, spec.model)
    engine = build_engine(spec)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    info = WorkerInfo(
        pid=os.getpid(), protocol=PROTOCOL_VERSION, spec_digest=spec_digest(spec),
        name=engine.name, model_id=engine.model_id(), capabilities=engine.capabilities,
        log_path=_log_path(args.socket),
    )  # fmt: skip
    server = _Server(engine, info, stop)
    listener = _listen(args.socket)
    inode = os.stat(args.socket).st_ino
    holder.append(server)
    logger.info("ready on %s (pid %d)", args.socket, os.getpid())
    try:
        server.serve(listener)
    finally:
        listener.close()
        _unlink_if_ours(args.socket, inode)
        _close_engine(engine)
        logger.info("worker stopped")
    return 0


# --------------------------------------------------------------------------- client side


@contextlib.contextmanager
def file_lock(path: str, timeout: float, fail: Callable[[], Exception]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created 0600); raise ``fail()`` after
    ``timeout`` seconds of waiting."""
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


def _file_lock(path: str, timeout: float) -> contextlib.AbstractContextManager[None]:
    def fail() -> BackendError:
        msg = (
            f"timed out after {timeout:.0f} s waiting for the worker start lock {path}; "
            "another process is starting a worker (log: "
            f"{_log_path(path.removesuffix('.lock') + '.sock')})"
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
        _send(sock, _Call("ping"))
        _recv(sock)
    except (OSError, EOFError, ConnectionError):
        return False
    finally:
        sock.close()
    return True


def _spawn(spec: BackendSpec, path: str, idle_timeout: float) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    package_root = pathlib.Path(__file__).resolve().parents[2]
    if package_root.name not in ("site-packages", "dist-packages"):  # a source checkout
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(package_root), env.get("PYTHONPATH")) if p
        )
    cmd = [
        sys.executable, "-m", "llmsql.backends.worker", "--socket", path,
        "--parent-pid", str(os.getpid()), "--idle-timeout", str(idle_timeout),
    ]  # fmt: skip
    log_fd = os.open(_log_path(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
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


def _wait_ready(proc: subprocess.Popen[bytes], path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _kill_session(proc.pid)
            msg = (
                f"the llmsql worker exited with code {proc.returncode} while starting; "
                f"its log {_log_path(path)} ends with:\n{_log_tail(_log_path(path))}"
            )
            raise BackendError(msg, backend="worker")
        if os.path.exists(path) and _alive(path):
            return
        time.sleep(0.05)
    _kill_group(proc)
    msg = (
        f"the llmsql worker did not become ready within {timeout:.0f} s and was killed; "
        f"raise startup_timeout if the model is large. Its log {_log_path(path)} ends "
        f"with:\n{_log_tail(_log_path(path))}"
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
    for pid in _session_members(sid):
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
            _send(sock, _Call("shutdown"))
            _recv(sock)
    try:
        proc.wait(timeout=_CLOSE_GRACE_S)
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
        self.log_path = _log_path(self.socket_path)
        startup = _pick(startup_timeout, spec.option("startup_timeout"), DEFAULT_STARTUP_TIMEOUT)
        idle = _pick(idle_timeout, spec.option("idle_timeout"), DEFAULT_IDLE_TIMEOUT)
        self._proc = _attach_or_start(spec, self.socket_path, startup, idle)
        self._conns: list[socket.socket] = []
        self._conns_lock = threading.Lock()
        self._local = threading.local()
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
        out = cast("list[Response]", self._call("generate", list(batch)))
        if len(out) != len(batch):
            msg = f"worker returned {len(out)} responses for {len(batch)} requests"
            raise BackendError(msg, backend=self.spec.kind)
        return out

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
        """Call an engine method listed in :data:`ADMIN_CALLS`, e.g. ``reset_prefix_cache``.

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
            _send(conn, _Call(op, args))
            reply = cast("_Reply", _recv(conn))
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
            f"{_log_tail(self.log_path)}",
            backend=self.spec.kind,
        )

    def _remote_error(self, op: str, reply: _Reply) -> LLMSQLError:
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


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: pickled messages must name
    # llmsql.backends.worker classes, which clients can unpickle.
    from llmsql.backends import worker as _worker

    _code = _worker.main()
    logging.shutdown()
    os._exit(_code)  # the engine is closed; skip the slow torch/vLLM interpreter teardown
