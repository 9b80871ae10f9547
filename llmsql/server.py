"""``llmsql serve``: an OpenAI-compatible HTTP server over a local backend.

So a team can share one GPU box: ``llmsql serve --backend vllm --model M --port 8000`` on
it, and ``llmsql run ... --backend openai --base-url http://HOST:8000/v1`` anywhere.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``,
``POST /tokenize`` (vLLM's shape: ``{"count": n, "max_model_len": m}``) and ``GET /health``.
Requests from all connections go to one worker thread that owns the backend; it takes every
request queued within a few milliseconds (up to ``max_batch``) as one batch, so concurrent
clients are answered by batched generation and share prompt prefixes. A queued request
whose client hangs up (a client-side timeout) is dropped before it is computed, so clients
that retry do not pile up work.

What is supported, as llmsql's backends can do it: one ``user`` message per chat request
(its text, or text parts), which the backend wraps in the model's chat template; a
completions ``prompt`` is treated the same way (one string, or a list of one). Options:
``max_tokens`` / ``max_completion_tokens``, ``temperature`` (default 1, as OpenAI),
``seed``, ``ignore_eos``, choices through ``structured_outputs: {"choice": [...]}`` or
``guided_choice``, JSON schemas through ``response_format`` (where the backend can). Other
fields are ignored, except those that would change the answer's shape (``stream``,
``n > 1``, ``tools``, ``stop``), which are refused with HTTP 400.

Log-probabilities (chat: ``logprobs: true`` with ``top_logprobs: k``; completions:
``logprobs: k``; k at most 20) are answered for requests constrained to choices, where the
backend gives choice probabilities (the transformers backend: exact): the answer is one
"token", the chosen choice, and the top ``k`` alternatives are the choices, each with its
log-probability renormalized over the choices (what LLM_SCORE reads through the ``openai``
backend). Without choices, ``logprobs`` is refused with HTTP 400.

``--request-log PATH`` writes one JSON line per generated answer (that is, per answer paid
for): the client's ``X-Request-Id``, the prompt's SHA-256 (never its text), token counts,
the batch, and the times it was queued and answered. ``--api-key-env NAME`` makes the server
require ``Authorization: Bearer $NAME``.
"""

# Why this module is over 500 lines: the HTTP front, the batching worker and the request
# parsing (log-probabilities included) make one small server whose parts share its error
# type and config; each part is short, and splitting would scatter a three-endpoint server
# over three files.

from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import json
import logging
import math
import queue
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from llmsql.backends.base import LLMBackend, Request, Response

if TYPE_CHECKING:
    from collections.abc import Callable

    from llmsql.backends.openai_compat import Secret

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 << 20
"""Larger request bodies are refused with 413."""


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """How ``llmsql serve`` listens and batches."""

    host: str = "127.0.0.1"
    port: int = 8000
    """0 picks a free port (printed on start)."""
    served_name: str = "smollm2"
    """The model name clients use (``--served-model-name``)."""
    aliases: tuple[str, ...] = ()
    """Other names accepted for the model."""
    max_batch: int = 32
    """Most requests answered by one ``generate`` call."""
    batch_wait: float = 0.005
    """Seconds to wait for more requests after the first of a batch arrives."""
    request_log: str | None = None
    api_key: Secret | None = None
    default_max_tokens: int = 256
    request_timeout: float = 600.0
    """Seconds a request may wait for its answer before the server gives 503."""
    prompt_tokens_details: bool = True
    """Report cached prompt tokens in ``usage.prompt_tokens_details`` (off: as vLLM's server
    without ``--enable-prompt-tokens-details``)."""


class _BadRequest(Exception):
    """A client error: HTTP status and an OpenAI-style error message."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


# ---- the worker that owns the backend ------------------------------------------------------------


@dataclass(slots=True)
class _Job:
    request: Request
    request_id: str
    endpoint: str
    queued: float
    future: concurrent.futures.Future[Response]
    cancelled: bool = False
    """Set when the client hung up before the job ran: it is then skipped, never paid."""


class _ClientGone(Exception):
    """The client closed its connection while its request waited."""


@dataclass(slots=True)
class _Count:
    text: str
    future: concurrent.futures.Future[int]


class Batcher:
    """One thread that owns the backend and answers queued requests in batches."""

    def __init__(self, backend: LLMBackend, config: ServeConfig) -> None:
        """Start the worker thread."""
        self._backend = backend
        self._config = config
        self._queue: queue.Queue[_Job | _Count | None] = queue.Queue()
        self._log_lock = threading.Lock()
        # open for the server's lifetime, closed in close()
        self._log = (open(config.request_log, "a", encoding="utf-8")  # noqa: SIM115
                     if config.request_log else None)
        self._batches = 0
        self._thread = threading.Thread(target=self._work, name="llmsql-serve-worker",
                                        daemon=True)
        self._thread.start()

    def submit(self, request: Request, request_id: str, endpoint: str,
               gone: Callable[[], bool] = lambda: False) -> Response:
        """Queue ``request`` and wait for its answer; ``gone()`` tells if the client hung up
        (a queued request of a client that left is dropped before it is computed).

        Raises:
            _BadRequest: 503 when the answer takes longer than ``request_timeout``.
            _ClientGone: the client left before its request ran.
        """
        future: concurrent.futures.Future[Response] = concurrent.futures.Future()
        job = _Job(request, request_id, endpoint, time.time(), future)
        self._queue.put(job)
        deadline = time.monotonic() + self._config.request_timeout
        while time.monotonic() < deadline:
            try:
                return future.result(timeout=0.25)
            except concurrent.futures.TimeoutError:
                if not job.cancelled and gone():
                    job.cancelled = True
        raise _BadRequest(503, "the model is busy; try again later", "server_error")

    def count(self, text: str) -> int:
        """Tokens of ``text``, counted on the worker thread (tokenizers are not thread-safe)."""
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._queue.put(_Count(text, future))
        return future.result(timeout=self._config.request_timeout)

    def close(self) -> None:
        """Stop after the current batch; close the request log."""
        self._queue.put(None)
        self._thread.join(timeout=60)
        if self._log is not None:
            with self._log_lock:
                self._log.close()
                self._log = None

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            if isinstance(first, _Count):
                self._count(first)
                continue
            batch, stop = self._collect(first)
            self._generate(batch)
            if stop:
                return

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        """``first`` plus what arrives within ``batch_wait`` (up to ``max_batch``)."""
        batch = [first]
        deadline = time.monotonic() + self._config.batch_wait
        while len(batch) < self._config.max_batch:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                return batch, True
            if isinstance(item, _Count):
                self._count(item)
            else:
                batch.append(item)
        return batch, False

    def _count(self, job: _Count) -> None:
        try:
            job.future.set_result(self._backend.count_tokens(job.text))
        except Exception as exc:  # boundary: report to the waiting handler
            job.future.set_exception(exc)

    def _generate(self, batch: list[_Job]) -> None:
        for job in batch:
            if job.cancelled:
                job.future.set_exception(_ClientGone())
        batch = [j for j in batch if not j.cancelled]
        if not batch:
            return
        self._batches += 1
        try:
            answers = self._backend.generate([j.request for j in batch])
        except Exception as exc:  # boundary: every waiting handler answers 500
            logger.exception("generation failed for a batch of %d", len(batch))
            for job in batch:
                job.future.set_exception(exc)
            return
        for job, answer in zip(batch, answers, strict=True):
            self._write_log(job, answer, len(batch))
            job.future.set_result(answer)

    def _write_log(self, job: _Job, answer: Response, size: int) -> None:
        if self._log is None:
            return
        line = json.dumps({
            "request_id": job.request_id, "endpoint": job.endpoint,
            "prompt_sha256": hashlib.sha256(job.request.prompt.encode("utf-8")).hexdigest(),
            "prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.output_tokens,
            "cached_tokens": answer.cached_tokens, "error": answer.error is not None,
            "answer_sha256": hashlib.sha256(answer.text.encode("utf-8")).hexdigest(),
            "batch": self._batches, "batch_size": size, "queued": job.queued,
            "answered": time.time(),
        })
        with self._log_lock:
            if self._log is not None:
                self._log.write(line + "\n")
                self._log.flush()


# ---- request parsing -----------------------------------------------------------------------------

MAX_TOP_LOGPROBS = 20
"""Most alternatives a request may ask for (``top_logprobs``), as OpenAI and vLLM."""
_REFUSED = {"stream": "streaming", "tools": "tools",
            "stop": "stop sequences", "functions": "functions"}


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise _BadRequest(400, "message content must be a string or a list of text parts")


def _prompt_of(body: dict[str, Any], endpoint: str) -> str:
    if endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or len(messages) != 1 or not isinstance(
            messages[0], dict
        ) or messages[0].get("role") != "user":
            raise _BadRequest(400, "send exactly one message with role 'user' (this server "
                              "applies the model's own chat template around it)")
        return _text_of(messages[0].get("content"))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _BadRequest(400, "prompt must be one string")
    return prompt


def _choices_of(body: dict[str, Any]) -> tuple[str, ...] | None:
    structured = body.get("structured_outputs")
    raw = structured.get("choice") if isinstance(structured, dict) else None
    raw = raw if raw is not None else body.get("guided_choice")
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw or not all(isinstance(c, str) and c for c in raw):
        raise _BadRequest(400, "choice must be a non-empty list of non-empty strings")
    return tuple(raw)


def _schema_of(body: dict[str, Any]) -> str | None:
    fmt = body.get("response_format")
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return None
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        return json.dumps({"type": "object"})
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(
        fmt.get("json_schema"), dict
    ) and isinstance(fmt["json_schema"].get("schema"), dict):
        return json.dumps(fmt["json_schema"]["schema"])
    raise _BadRequest(400, "response_format must be text, json_object or json_schema with a "
                      "schema")


def _number(body: dict[str, Any], key: str, default: float, *, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise _BadRequest(400, f"{key} must be a number between {low:g} and {high:g}")
    return float(value)


def top_logprobs(body: dict[str, Any], endpoint: str) -> int | None:
    """How many alternatives the body asks log-probabilities for (None: no log-probabilities).

    >>> top_logprobs({"logprobs": True, "top_logprobs": 5}, "chat"), top_logprobs({}, "chat")
    (5, None)
    >>> top_logprobs({"logprobs": 0}, "completions")
    0

    Raises:
        _BadRequest: the count is not an integer in 0..20.
    """
    if endpoint == "chat":
        if not body.get("logprobs"):
            return None
        top = body.get("top_logprobs") or 0
    else:
        top = body.get("logprobs")
        if top is None or top is False:
            return None
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise _BadRequest(400, f"top_logprobs must be an integer between 0 and {MAX_TOP_LOGPROBS}")
    return top


def choice_logprobs(request: Request, answer: Response, top: int, endpoint: str
                    ) -> dict[str, Any] | None:
    """The reply's ``logprobs`` field for an answer with choice probabilities: one "token"
    (the chosen choice) and the ``top`` most probable choices, log-probabilities renormalized
    over the choices, in the endpoint's shape (None where the answer has none).
    """
    choices, probs = request.choices, answer.choice_probs
    if choices is None or probs is None:
        return None
    logps = [math.log(p) if p > 0 else -9999.0 for p in probs]
    ranked = sorted(range(len(choices)), key=lambda j: (-probs[j], j))
    chosen = choices.index(answer.text) if answer.text in choices else ranked[0]
    if endpoint != "chat":
        return {"tokens": [choices[chosen]], "token_logprobs": [logps[chosen]],
                "top_logprobs": [{choices[j]: logps[j] for j in ranked[:top]}],
                "text_offset": [0]}

    def entry(j: int) -> dict[str, Any]:
        return {"token": choices[j], "logprob": logps[j],
                "bytes": list(choices[j].encode("utf-8"))}

    return {"content": [{**entry(chosen), "top_logprobs": [entry(j) for j in ranked[:top]]}]}


def parse_request(body: Any, endpoint: str, backend: LLMBackend, config: ServeConfig) -> Request:
    """The :class:`Request` an OpenAI-style body asks for.

    Raises:
        _BadRequest: the body is not a request this server can answer as asked.
    """
    if not isinstance(body, dict):
        raise _BadRequest(400, "the body must be a JSON object")
    for key, what in _REFUSED.items():
        if body.get(key):
            raise _BadRequest(400, f"{what} are not supported by llmsql serve")
    if body.get("n", 1) != 1:
        raise _BadRequest(400, "n must be 1")
    caps = backend.capabilities
    choices, schema = _choices_of(body), _schema_of(body)
    if choices is not None and not caps.constrained_choice:
        raise _BadRequest(400, "this backend cannot constrain answers to choices")
    if schema is not None and not caps.json_schema:
        raise _BadRequest(400, "this backend cannot constrain answers to a JSON schema")
    scored = top_logprobs(body, endpoint) is not None
    if scored and (choices is None or not caps.choice_probabilities):
        raise _BadRequest(400, "logprobs are supported only for requests constrained to "
                          "choices (structured_outputs or guided_choice), where the backend "
                          "gives choice probabilities")
    tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = config.default_max_tokens if tokens is None else int(_number(
        {"max_tokens": tokens}, "max_tokens", 0, low=1, high=caps.max_model_len))
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _BadRequest(400, "seed must be an integer")
    return Request(
        prompt=_prompt_of(body, endpoint), max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, low=0.0, high=2.0), seed=seed,
        choices=choices, json_schema=schema, ignore_eos=bool(body.get("ignore_eos", False)),
        choice_probs=scored,
    )


# ---- HTTP ----------------------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    app: LLMServer


class _Handler(BaseHTTPRequestHandler):
    """Routes one connection's requests (keep-alive) to the :class:`LLMServer`."""

    protocol_version = "HTTP/1.1"
    server: _HTTPServer
    _body_read = False
    timeout = 120  # an idle or stalled connection is dropped after this many seconds

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        """Models and health."""
        self._dispatch({"/v1/models": self.server.app.models, "/health": self.server.app.health},
                       body=False)

    def do_POST(self) -> None:
        """Completions and tokenize."""
        app = self.server.app
        self._dispatch({"/v1/chat/completions": app.chat, "/v1/completions": app.completions,
                        "/tokenize": app.tokenize, "/v1/tokenize": app.tokenize}, body=True)

    def _dispatch(self, routes: dict[str, Any], *, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        self._body_read = False
        try:
            handler = routes.get(path)
            if handler is None:
                raise _BadRequest(404, f"no endpoint {path}", "not_found_error")
            if path != "/health":
                self.server.app.check_key(self.headers.get("Authorization"))
            payload = self._read_json() if body else None
            rid = self.headers.get("X-Request-Id") or uuid.uuid4().hex
            self._send(200, handler(payload, rid, self.client_gone) if body else handler())
        except _BadRequest as exc:
            if body and not self._body_read:
                self.close_connection = True  # the unread body must not become a request
            self._send(exc.status, {"error": {"message": str(exc), "type": exc.kind}})
        except (BrokenPipeError, ConnectionResetError, _ClientGone):
            self.close_connection = True
        except Exception as exc:  # boundary: a server error must not kill the connection thread
            logger.exception("request %s failed", path)
            self._send(500, {"error": {"message": f"internal error: {type(exc).__name__}",
                                       "type": "server_error"}})

    def client_gone(self) -> bool:
        """Whether the client closed the connection (EOF waiting; pipelined data is not)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _read_json(self) -> Any:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise _BadRequest(411, "send the body with a Content-Length")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            raise _BadRequest(411, "a Content-Length header is required") from None
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            raise _BadRequest(413, f"the body must be at most {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(length)
        self._body_read = True
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise _BadRequest(400, "the body is not valid JSON (or nests too deeply)") from None

    def _send(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode("utf-8")
        try:
            self.send_response(status, HTTPStatus(status).phrase)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left; its answer was computed anyway


class LLMServer:
    """The OpenAI-compatible server: HTTP front, one batching worker, one backend."""

    def __init__(self, backend: LLMBackend, config: ServeConfig) -> None:
        """Bind the socket (port 0: any free port) and start the worker; not yet serving."""
        self.backend = backend
        self.config = config
        self._batcher = Batcher(backend, config)
        self._httpd = _HTTPServer((config.host, config.port), _Handler)
        self._httpd.app = self
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port actually bound."""
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """The API root clients use as ``base_url``."""
        return f"http://{self.config.host}:{self.port}/v1"

    def start(self) -> LLMServer:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True,
                                        name="llmsql-serve-http")
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted."""
        self._httpd.serve_forever()

    def close(self) -> None:
        """Stop serving and stop the worker (the backend stays open: its owner closes it)."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=10)
        self._httpd.server_close()
        self._batcher.close()

    def __enter__(self) -> LLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- endpoints ------------------------------------------------------------------------------

    def check_key(self, header: str | None) -> None:
        """Raise 401 unless the request carries the server's key (when it has one)."""
        key = self.config.api_key
        if key is None:
            return
        given = (header or "").removeprefix("Bearer ").encode("utf-8")
        if not hmac.compare_digest(given, key.reveal().encode("utf-8")):
            raise _BadRequest(401, "missing or wrong API key", "authentication_error")

    def health(self) -> dict[str, Any]:
        """Liveness."""
        return {"status": "ok"}

    def models(self) -> dict[str, Any]:
        """The one served model, with its context length and llmsql capabilities."""
        caps = self.backend.capabilities
        entry = {"id": self.config.served_name, "object": "model", "created": 0,
                 "owned_by": "llmsql", "max_model_len": caps.max_model_len,
                 "llmsql_capabilities": {
                     "constrained_choice": caps.constrained_choice,
                     "json_schema": caps.json_schema, "prefix_caching": caps.prefix_caching,
                     "reports_cached_tokens": caps.reports_cached_tokens,
                     "block_size": caps.block_size,
                     "choice_probabilities": caps.choice_probabilities,
                 }}
        return {"object": "list", "data": [entry]}

    def _check_model(self, body: Any) -> None:
        name = body.get("model") if isinstance(body, dict) else None
        if name is not None and name != self.config.served_name and \
                name not in self.config.aliases:
            raise _BadRequest(404, f"model {str(name)[:100]!r} does not exist; this server "
                              f"serves {self.config.served_name!r}", "not_found_error")

    def _answer(self, body: Any, rid: str, endpoint: str,
                gone: Callable[[], bool]) -> tuple[Request, Response]:
        self._check_model(body)
        request = parse_request(body, endpoint, self.backend, self.config)
        answer = self._batcher.submit(request, rid, endpoint, gone)
        if answer.error is not None:
            raise _BadRequest(400, answer.error)
        return request, answer

    def _envelope(self, kind: str, request: Request, answer: Response) -> dict[str, Any]:
        finish = "length" if answer.output_tokens >= request.max_tokens else "stop"
        usage: dict[str, Any] = {"prompt_tokens": answer.prompt_tokens,
                 "completion_tokens": answer.output_tokens,
                 "total_tokens": answer.prompt_tokens + answer.output_tokens}
        if self.config.prompt_tokens_details:
            usage["prompt_tokens_details"] = {"cached_tokens": answer.cached_tokens}
        return {"id": f"{kind}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.config.served_name, "usage": usage, "finish": finish}

    def chat(self, body: Any, rid: str, gone: Callable[[], bool]) -> dict[str, Any]:
        """``/v1/chat/completions``."""
        request, answer = self._answer(body, rid, "chat", gone)
        out = self._envelope("chatcmpl", request, answer)
        finish = out.pop("finish")
        out["object"] = "chat.completion"
        out["choices"] = [{"index": 0, "finish_reason": finish,
                           "message": {"role": "assistant", "content": answer.text}}]
        if request.choice_probs:
            out["choices"][0]["logprobs"] = choice_logprobs(
                request, answer, top_logprobs(body, "chat") or 0, "chat")
        return out

    def completions(self, body: Any, rid: str, gone: Callable[[], bool]) -> dict[str, Any]:
        """``/v1/completions``."""
        request, answer = self._answer(body, rid, "completions", gone)
        out = self._envelope("cmpl", request, answer)
        finish = out.pop("finish")
        out["object"] = "text_completion"
        out["choices"] = [{"index": 0, "text": answer.text, "finish_reason": finish}]
        if request.choice_probs:
            out["choices"][0]["logprobs"] = choice_logprobs(
                request, answer, top_logprobs(body, "completions") or 0, "completions")
        return out

    def tokenize(self, body: Any, rid: str, gone: Callable[[], bool]) -> dict[str, Any]:
        """``/tokenize``: vLLM's shape (the count includes the chat template)."""
        del rid, gone
        if not isinstance(body, dict):
            raise _BadRequest(400, "the body must be a JSON object")
        text = _prompt_of(body, "chat" if "messages" in body else "completions")
        return {"count": self._batcher.count(text),
                "max_model_len": self.backend.capabilities.max_model_len}
