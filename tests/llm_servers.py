"""Real servers for the reliability tests, all on 127.0.0.1 and bounded in time.

- :func:`shared_server`: one ``llmsql serve`` subprocess (the embedded SmolLM2 model through
  the transformers backend) for the whole test run, started on first use and stopped at exit.
  It requires an API key (``SERVER_KEY_ENV``) and writes a request log: one JSON line per
  answer it generated, i.e. per answer paid for.
- :class:`FaultProxy`: an HTTP proxy written for the tests that sits between a client and a
  server and injects faults on completion requests: 429 with Retry-After, 500s before or
  after the server computed the answer, dropped connections, stalls past the client's
  timeout, truncated bodies and malformed JSON, or rewrites answers into hostile text.
- :func:`join_logs`: joins the server's request log with the client's attempt log.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import os
import random
import secrets
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SERVER_KEY_ENV = "LLMSQL_TEST_SERVER_KEY"
SERVER_MAX_MODEL_LEN = 1024
START_TIMEOUT_S = 300.0


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every JSON line of ``path`` (none if it does not exist)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


# ---- llmsql serve ---------------------------------------------------------------------------------


@dataclass
class ServeProcess:
    """A running ``llmsql serve`` subprocess."""

    proc: subprocess.Popen[str]
    url: str
    request_log: Path
    key: str
    stderr_path: Path

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s; only this process, by its pid."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_serve(folder: Path, *extra: str, key: str | None = None) -> ServeProcess:
    """Start ``llmsql serve`` on a free port; wait (bounded) until it prints its URL."""
    log = folder / "server-requests.jsonl"
    err = folder / "server-stderr.txt"
    key = key or secrets.token_hex(16)
    env = {**os.environ, SERVER_KEY_ENV: key, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "llmsql.cli", "serve", "--backend", "transformers",
           "--port", "0", "--request-log", str(log), "--api-key-env", SERVER_KEY_ENV,
           "--option", f"max_model_len={SERVER_MAX_MODEL_LEN}", *extra]
    with err.open("w") as err_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=err_file, text=True, preexec_fn=_die_with_parent)
    url = _wait_for_url(proc, err)
    return ServeProcess(proc, url, log, key, err)


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies, however it dies (Linux)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _wait_for_url(proc: subprocess.Popen[str], err: Path) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llmsql serve exited with {proc.returncode}: "
                               f"{err.read_text()[-2000:]}")
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if "serving" in line:
                return line.strip().rsplit(" at ", 1)[1]
    proc.kill()
    proc.wait(timeout=10)
    raise RuntimeError(f"llmsql serve did not start within {START_TIMEOUT_S:.0f} s")


_SHARED: ServeProcess | None = None
_SHARED_LOCK = threading.Lock()


def shared_server() -> ServeProcess:
    """The one ``llmsql serve`` of this test run (started on first use, stopped at exit)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None or _SHARED.proc.poll() is not None:
            folder = Path(tempfile.mkdtemp(prefix="llmsql-serve-"))
            _SHARED = start_serve(folder)
            atexit.register(_SHARED.stop)
        return _SHARED


def client_options(server: ServeProcess, log: Path | None = None, **extra: Any) -> dict[str, Any]:
    """``llmsql.connect`` keyword arguments for the openai backend against ``server``."""
    os.environ[SERVER_KEY_ENV] = server.key
    opts: dict[str, Any] = {"backend": "openai", "base_url": server.url, "model": "smollm2",
                            "api_key_env": SERVER_KEY_ENV, "progress": False}
    if log is not None:
        opts["request_log"] = str(log)
    opts.update(extra)
    return opts


# ---- the fault-injecting proxy ----------------------------------------------------------------------

FAULTS: tuple[str, ...] = (
    "429", "500_before", "500_after", "drop_before", "drop_after", "stall_after",
    "truncate", "malformed", "garbage",
)
"""Fault kinds; ``*_after`` and the body faults happen after the server computed (and was
paid for) the answer, so the answer is lost in transit."""

LOST_AFTER_PAYING = frozenset({"500_after", "drop_after", "stall_after", "truncate",
                               "malformed", "garbage"})


@dataclass
class FaultPlan:
    """Which fault each completion request gets: ``first`` in order, then random ones."""

    first: tuple[str, ...] = FAULTS
    rates: dict[str, float] = field(default_factory=dict)
    seed: int = 1234
    _n: int = 0
    _rng: random.Random = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def next(self) -> str:
        with self._lock:
            n, self._n = self._n, self._n + 1
            if n < len(self.first):
                return self.first[n]
            x = self._rng.random()
        for fault, rate in self.rates.items():
            if x < rate:
                return fault
            x -= rate
        return "ok"


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    proxy: FaultProxy

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # connections dropped on purpose are the point of this proxy


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer
    timeout = 120

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._reply(*self.server.proxy.forward("GET", self.path, None, self.headers))

    def do_POST(self) -> None:
        proxy = self.server.proxy
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        fault = proxy.plan.next() if self.path.endswith("completions") else "ok"
        proxy.record(self.headers.get("X-Request-Id", ""), fault)
        if fault == "429":
            return self._json(429, {"error": {"message": "slow down"}},
                              {"Retry-After": f"{proxy.retry_after:g}"})
        if fault == "500_before":
            return self._json(500, {"error": {"message": "injected"}})
        if fault == "drop_before":
            return self._drop()
        forwarded = self._forward_watching(body)
        if forwarded is None:
            return None  # the client left: the server was told by the closed connection
        return self._after(fault, *forwarded)

    def _forward_watching(self, body: bytes) -> tuple[int, dict[str, str], bytes] | None:
        """Forward upstream; if the client hangs up meanwhile, hang up upstream too (as a
        real proxy does), so the server can drop the abandoned request."""
        proxy = self.server.proxy
        conn = http.client.HTTPConnection(proxy.host, proxy.port_up, timeout=300)
        out: dict[str, Any] = {}

        def work() -> None:
            try:
                out["reply"] = proxy.forward("POST", self.path, body, self.headers, conn)
            except (OSError, http.client.HTTPException) as exc:
                out["error"] = exc

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.25)
            if worker.is_alive() and self._client_gone():
                if conn.sock is not None:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                worker.join(10)
                return None
        if "error" in out:
            self._drop()
            return None
        return out["reply"]  # type: ignore[no-any-return]

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _after(self, fault: str, status: int, headers: dict[str, str], data: bytes) -> None:
        proxy = self.server.proxy
        if fault == "500_after":
            return self._json(500, {"error": {"message": "injected after"}})
        if fault == "drop_after":
            return self._drop()
        if fault == "stall_after":
            time.sleep(proxy.stall)
            return self._drop()
        if fault == "truncate":
            return self._truncated(status, data)
        if fault == "malformed":
            return self._reply(200, {"Content-Type": "application/json"}, data[: len(data) // 2])
        if fault == "garbage":
            return self._json(200, {"id": "x", "choices": []})
        if status == 200 and proxy.rewrite is not None:
            data = json.dumps(proxy.rewrite(json.loads(data))).encode()
        return self._reply(status, headers, data)

    def _json(self, status: int, payload: Any, extra: dict[str, str] | None = None) -> None:
        self._reply(status, {"Content-Type": "application/json", **(extra or {})},
                    json.dumps(payload).encode())

    def _reply(self, status: int, headers: dict[str, str], data: bytes) -> None:
        try:
            self.send_response(status)
            for k, v in headers.items():
                if k.lower() not in ("content-length", "connection", "transfer-encoding",
                                     "date", "server"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True  # the client already left

    def _truncated(self, status: int, data: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
        except OSError:
            pass
        self._drop()

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 that injects faults into completion requests."""

    def __init__(self, upstream: str, plan: FaultPlan | None = None, *, stall: float = 10.0,
                 retry_after: float = 1.0,
                 rewrite: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        parts = urllib.parse.urlsplit(upstream)
        self.host, self.port_up = parts.hostname or "127.0.0.1", parts.port or 80
        self.plan = plan or FaultPlan(first=())
        self.stall, self.retry_after, self.rewrite = stall, retry_after, rewrite
        self.events: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._httpd = _ProxyServer(("127.0.0.1", 0), _ProxyHandler)
        self._httpd.proxy = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def record(self, attempt_id: str, fault: str) -> None:
        with self._lock:
            self.events.append((attempt_id, fault))

    def faults(self) -> Counter[str]:
        return Counter(f for _, f in self.events)

    def forward(self, method: str, path: str, body: bytes | None, headers: Any,
                conn: http.client.HTTPConnection | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = conn or http.client.HTTPConnection(self.host, self.port_up, timeout=300)
        try:
            keep = {k: headers[k] for k in ("Content-Type", "Authorization", "X-Request-Id")
                    if headers.get(k)}
            conn.request(method, path, body=body, headers=keep)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()


# ---- joining the logs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Joined:
    """What the server paid for versus what reached the client."""

    prompts: int
    """Distinct prompts the server generated answers for (in this client's attempts)."""
    paid: int
    """Answers the server generated (one per request-log line)."""
    repaid: int
    """``paid - prompts``: answers paid for more than once."""
    lost_in_transit: int
    """Paid answers whose attempt did not end ``ok`` at the client (proxy faults, timeouts)."""
    paid_after_delivery: int
    """Answers paid for a prompt after an earlier answer to it had reached the client."""
    unmatched_answers: int
    """Attempts the client accepted whose answer differs from what the server generated."""
    attempts: Counter[str]
    """Client attempt outcomes."""


def join_logs(server_log: Path, client_logs: list[Path]) -> Joined:
    """Join the server's request log with the client's attempt logs by attempt id."""
    client = [e for p in client_logs for e in read_jsonl(p)]
    by_attempt = {e["attempt_id"]: e for e in client}
    served = [e for e in read_jsonl(server_log) if e["request_id"] in by_attempt]
    delivered: dict[str, float] = {}
    for e in client:
        if e["outcome"] == "ok":
            delivered[e["prompt_sha256"]] = min(delivered.get(e["prompt_sha256"], e["t"]), e["t"])
    lost = sum(1 for e in served if by_attempt[e["request_id"]]["outcome"] != "ok")
    after = sum(1 for e in served if e["queued"] > delivered.get(e["prompt_sha256"], 1e300))
    unmatched = sum(1 for e in served if by_attempt[e["request_id"]]["outcome"] == "ok"
                    and by_attempt[e["request_id"]]["answer_sha256"] != e["answer_sha256"])
    prompts = len({e["prompt_sha256"] for e in served})
    return Joined(prompts, len(served), len(served) - prompts, lost, after, unmatched,
                  Counter(e["outcome"] for e in client))
