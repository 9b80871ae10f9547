"""The worker process: one engine served over a Unix socket (``python -m llmsql.backends.worker``).

:func:`main` reads a pickled :class:`BackendSpec` on stdin, builds the engine
(:func:`build_engine`), listens at ``--socket`` and serves until a client asks it to shut
down, its owner (``--parent-pid``) dies, or no client has been connected for
``--idle-timeout`` seconds. The engine is called from the main thread only; consecutive
``generate`` calls of several clients are merged into one engine batch (:class:`_Server`).

This module never imports :mod:`.client`: both speak :mod:`.protocol`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import pickle
import queue
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from llmsql.backends.base import BackendSpec, LLMBackend, Request, Response
from llmsql.backends.moe_glue import backend_moe_stats, stats_delta, stats_split
from llmsql.backends.worker.protocol import (
    ADMIN_CALLS,
    CLIENT_OPTIONS,
    CLOSE_GRACE_S,
    DEFAULT_IDLE_TIMEOUT,
    PROTOCOL_VERSION,
    Call,
    Generated,
    Reply,
    WorkerInfo,
    WorkerStats,
    log_path,
    recv,
    send,
    session_members,
    spec_digest,
)
from llmsql.errors import BackendError, UnsupportedError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from llmsql.moe.plan import OffloadStats

logger = logging.getLogger(__name__)

ENGINES: dict[str, str] = {
    "vllm": "llmsql.backends.vllm:VLLMEngine",
}
"""Kinds whose in-worker engine differs from the registered backend (which is a client).

Any other kind is built inside the worker with :func:`llmsql.backends.get_backend`.
"""

_MAX_MERGED_REQUESTS = 8192
_POLL_S = 0.2


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


def generate_checked(engine: LLMBackend, batch: Sequence[Request], /) -> list[Response]:
    """``engine.generate(batch)``, except that requests with a LoRA adapter get an error
    Response when the engine cannot serve adapters (:attr:`Capabilities.adapters` False),
    instead of being answered by the base model.
    """
    if engine.capabilities.adapters or all(r.adapter is None for r in batch):
        return engine.generate(batch)
    plain = [i for i, r in enumerate(batch) if r.adapter is None]
    answers = engine.generate([batch[i] for i in plain]) if plain else []
    if len(answers) != len(plain):
        msg = f"engine returned {len(answers)} responses for {len(plain)} requests"
        raise BackendError(msg, backend=engine.name)
    out = dict(zip(plain, answers, strict=True))
    return [out[i] if i in out else Response("", error=_no_adapters(engine, r))
            for i, r in enumerate(batch)]


def _no_adapters(engine: LLMBackend, req: Request) -> str:
    name = req.adapter.name if req.adapter is not None else "?"
    return (f"adapter {name!r}: the {engine.name} engine in this llmsql worker cannot serve "
            "LoRA adapters; use the vllm or transformers backend for calls with adapter => ...")


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
        self._moe_seen: OffloadStats | None = None
        """The offload counters the replies have shared out so far (engine thread only)."""

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
            out = generate_checked(self._engine, batch)
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
        shares = self._moe_shares([len(job.args[0]) for job in group])
        start = 0
        for job, moe in zip(group, shares, strict=True):
            n = len(job.args[0])
            job.future.set_result(Generated(out[start : start + n], moe))
            start += n

    def _moe_shares(self, requests: list[int]) -> list[OffloadStats | None]:
        """What expert offload measured since the last replies, shared out by ``requests``
        (all None when the engine does not offload). Counters that moved between batches
        (or during a failed one) go with the next replies, so the replies add up to the
        worker's counters.
        """
        now = backend_moe_stats(self._engine)
        if now is None:
            return [None] * len(requests)
        delta = stats_delta(now, self._moe_seen)
        self._moe_seen = now
        return list(stats_split(delta, requests))

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
                call = cast("Call", recv(conn))
                send(conn, self._dispatch(call))
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

    def _dispatch(self, call: Call) -> Reply:
        try:
            return Reply(value=self._answer(call))
        except Exception as exc:  # boundary: errors travel back to the client
            return Reply(error=str(exc) or repr(exc), error_type=type(exc).__name__)

    def _answer(self, call: Call) -> object:
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
        """Snapshot of the counters (the engine's offload counters are read from this
        connection thread: a locked snapshot, not an engine call).
        """
        with self._lock:
            c = self._counters
            return WorkerStats(
                model_loads=1, requests=c.requests, client_batches=c.client_batches,
                engine_batches=c.engine_batches, prompt_tokens=c.prompt_tokens,
                cached_tokens=c.cached_tokens, output_tokens=c.output_tokens,
                engine_seconds=c.engine_seconds, connections=c.connections, pid=os.getpid(),
                uptime_s=time.monotonic() - self._started, moe=backend_moe_stats(self._engine),
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


def _exit_now(code: int) -> None:
    """Exit at once, killing the engine processes this worker's session holds."""
    for pid in session_members(os.getpid()):
        if pid != os.getpid():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    logging.shutdown()
    os._exit(code)


def _close_engine(engine: LLMBackend) -> None:
    timer = threading.Timer(CLOSE_GRACE_S, _exit_now, args=(3,))  # never hang on exit
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
        log_path=log_path(args.socket),
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
