"""The ``openai`` backend: any OpenAI-compatible server (``vllm serve``, SGLang, llama.cpp's
server, ``llmsql serve``, hosted APIs).

A batch is sent as concurrent HTTP requests (asyncio + httpx, at most ``concurrency`` in
flight) on an event loop that lives in one background thread for the backend's lifetime, so
connections are reused across batches. Every request is retried with exponential backoff and
jitter on HTTP 408/409/429/5xx, timeouts, dropped connections and truncated or malformed
replies, honouring ``Retry-After``; it is never retried on other 4xx answers, which become
that request's ``Response.error`` (401/403/404 stop the query: the key, URL or model is wrong).
Request and token rate limits (``rpm``, ``tpm``) are token buckets refilled continuously.

Spec options (all optional but ``base_url``):

==================  ===========================================================================
``base_url``        the server's API root, e.g. ``http://127.0.0.1:8000/v1``
``api_key_env``     the environment variable holding the API key (``OPENAI_API_KEY``); the key
                    is read once, sent only in the ``Authorization`` header, and never logged,
                    cached or put in an error message
``api_key``         the key itself (the session wraps it in :class:`Secret`)
``concurrency``     requests in flight at once (8)
``timeout``         seconds for one request, connection to last byte (300)
``max_retries``     retries per request after the first attempt (6)
``backoff``         first retry delay in seconds, doubled each retry (0.5), with jitter
``max_backoff``     longest delay between retries (30); a ``Retry-After`` up to
                    ``max_retry_after`` (120) is honoured even when longer
``rpm``, ``tpm``    requests and tokens per minute (tokens: 4 bytes per prompt token +
                    ``max_tokens``, corrected with the reported usage)
``endpoint``        ``chat`` (``/chat/completions``, default) or ``completions``
``structured``      how choices and JSON schemas are constrained: ``auto`` (from the server:
                    ``structured_outputs`` for vLLM and ``llmsql serve``, else ``none``),
                    ``structured_outputs``, ``guided`` (older vLLM), ``response_format``
                    (JSON schema only) or ``none``
``max_model_len``   the model's context (default: as the server reports it, else 32768)
``block_size``      the server's KV-cache block size in tokens (default: as the server says:
                    ``llmsql serve`` in its model list, vLLM in its ``/metrics``
                    cache-config gauge; else 16). Warm-ups are planned with it: a shared
                    prefix shorter than a block cannot be cached, so it is never warmed
``prefix_sharing``  ``true`` when the server computes a shared prefix once for requests that
                    arrive together, so warm-ups cannot pay (default: true for vLLM, which
                    caches a prompt's blocks when it schedules them: warm-ups sized to its
                    real 32-token blocks cost 7,500 tokens on W4 and saved 6,432, see
                    bench/results/server_blocks.md; false for other servers)
``choice_probs``    ``true`` when the server returns log-probabilities (``logprobs`` /
                    ``top_logprobs``), so a request with ``choice_probs`` (LLM_SCORE) gets its
                    choices' probabilities: the first answer token's top 20 log-probabilities,
                    matched to the choices by text and renormalized over them (default: true
                    for vLLM, as ``llmsql serve`` says for itself, false for other servers)
``request_log``     a JSONL file with one line per attempt: request id, attempt id, the
                    prompt's SHA-256, outcome, HTTP status, seconds (never the key or prompt)
==================  ===========================================================================

Cached tokens are read from ``usage.prompt_tokens_details.cached_tokens`` where the server
reports them (vLLM: started with ``--enable-prompt-tokens-details``); where it does not, the
statistics say "not reported" rather than 0%. ``count_tokens`` uses the server's ``/tokenize``
endpoint where it has one (vLLM, ``llmsql serve``), else estimates 3 bytes per token.

LoRA adapters: a request with an adapter (``adapter => 'name'``) gets an error Response and is
never sent (:func:`no_adapter_message`): the server's adapters cannot be checked against the
catalog's weights, so a remote adapter is used as its own model (``model => ...``) instead.

Building the backend contacts nothing: the server's model list (which model it serves, its
context and capabilities) is read on first need, i.e. the first request, token count or
``capabilities``. A named model's identity (``model_id``, part of every result cache key) needs
no server, so a re-run answered entirely from the result cache works with the server down.
Without a model name the server is asked which model it serves first, even for such a re-run.
"""

# Why this module is over 500 lines: one HTTP client seam whose parts (options, rate limits,
# retries and their classification, discovery of the server's capabilities, reply parsing
# with log-probabilities) each stay short and are used only here.

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from llmsql.backends.base import BackendSpec, Capabilities, Request, Response
from llmsql.backends.choice_probs import from_top_logprobs
from llmsql.backends.credentials import strip_credentials
from llmsql.errors import BackendError, ConfigError

if TYPE_CHECKING:
    from collections.abc import Coroutine, Sequence

    import httpx

logger = logging.getLogger(__name__)

T = TypeVar("T")

OPTIONS: tuple[str, ...] = (
    "api_key", "api_key_env", "backoff", "base_url", "choice_probs", "concurrency", "endpoint",
    "block_size", "max_backoff", "max_model_len", "max_retries", "max_retry_after",
    "prefix_sharing", "request_log", "rpm", "structured", "timeout", "tpm",
)
STRUCTURED_MODES: tuple[str, ...] = (
    "auto", "structured_outputs", "guided", "response_format", "none",
)
RETRY_STATUS: frozenset[int] = frozenset({408, 409, 425, 429})
"""Retried besides every 5xx."""
FATAL_STATUS: frozenset[int] = frozenset({401, 403, 404})
"""Stop the query: the key, the URL or the model is wrong, and every request would fail."""
DEFAULT_MAX_MODEL_LEN = 32768
MAX_ERROR_TEXT = 300
TOP_LOGPROBS = 20
"""Top log-probabilities asked for with ``choice_probs`` (OpenAI's and vLLM's maximum)."""
GIVE_UPS_TO_STOP = 16
"""Requests in a row that exhaust their retries before the query stops (server down)."""


class Secret:
    """A string that never shows itself in ``repr``/``str`` (API keys in specs and logs).

    >>> s = Secret("sk-123"); (repr(s), str(s), s.reveal())
    ("Secret('***')", '***', 'sk-123')
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        """Hold ``value``."""
        self._value = value

    def reveal(self) -> str:
        """The secret itself (only for the ``Authorization`` header)."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __reduce__(self) -> tuple[type[Secret], tuple[str]]:
        return (Secret, (self._value,))


# ---- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenAIConfig:
    """The validated options of an ``openai`` spec (see the module docstring)."""

    base_url: str
    model: str | None
    api_key: Secret | None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    timeout: float = 300.0
    max_retries: int = 6
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_retry_after: float = 120.0
    rpm: float | None = None
    tpm: float | None = None
    endpoint: str = "chat"
    structured: str = "auto"
    max_model_len: int | None = None
    request_log: str | None = None
    block_size: int | None = None
    prefix_sharing: bool | None = None
    choice_probs: bool | None = None

    @property
    def shown_url(self) -> str:
        """The base URL without credentials, for messages."""
        return strip_credentials(self.base_url)

    @staticmethod
    def from_spec(spec: BackendSpec) -> OpenAIConfig:
        """Validate ``spec``'s options; read the API key from the environment once.

        Raises:
            ConfigError: an unknown option, a bad value or no ``base_url``.
        """
        unknown = sorted(k for k, _ in spec.options if k not in OPTIONS)
        if unknown:
            msg = (
                f"unknown option(s) {', '.join(unknown)} for the openai backend; "
                f"accepted: {', '.join(OPTIONS)}"
            )
            raise ConfigError(msg)
        base = spec.option("base_url")
        if not base or not str(base).startswith(("http://", "https://")):
            msg = (
                "the openai backend needs base_url, the server's API root such as "
                "http://127.0.0.1:8000/v1 (--base-url on the command line, base_url=... in "
                "llmsql.connect, or OPENAI_BASE_URL)"
            )
            raise ConfigError(msg)
        env = str(spec.option("api_key_env", "OPENAI_API_KEY"))
        key = spec.option("api_key")
        if key is None and os.environ.get(env):
            key = os.environ[env]
        return OpenAIConfig(
            base_url=str(base).rstrip("/"), model=spec.model,
            api_key=key if isinstance(key, Secret) or key is None else Secret(str(key)),
            api_key_env=env,
            concurrency=int(_number(spec, "concurrency", 8, minimum=1)),
            timeout=_number(spec, "timeout", 300.0, minimum=0.001),
            max_retries=int(_number(spec, "max_retries", 6, minimum=0)),
            backoff=_number(spec, "backoff", 0.5, minimum=0.0),
            max_backoff=_number(spec, "max_backoff", 30.0, minimum=0.0),
            max_retry_after=_number(spec, "max_retry_after", 120.0, minimum=0.0),
            rpm=_optional(spec, "rpm"), tpm=_optional(spec, "tpm"),
            endpoint=_choice(spec, "endpoint", ("chat", "completions"), "chat"),
            structured=_choice(spec, "structured", STRUCTURED_MODES, "auto"),
            max_model_len=_optional_int(spec, "max_model_len"),
            request_log=spec.option("request_log"),
            block_size=_optional_int(spec, "block_size"),
            prefix_sharing=_optional_bool(spec, "prefix_sharing"),
            choice_probs=_optional_bool(spec, "choice_probs"),
        )


def _number(spec: BackendSpec, key: str, default: float, *, minimum: float) -> float:
    value = spec.option(key, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = minimum - 1
    if isinstance(value, bool) or number < minimum:
        msg = (
            f"option {key}={value!r} of the openai backend must be a number "
            f">= {minimum:g}"
        )
        raise ConfigError(msg)
    return number


def _optional(spec: BackendSpec, key: str) -> float | None:
    return None if spec.option(key) is None else _number(spec, key, 0, minimum=0.001)


def _optional_int(spec: BackendSpec, key: str) -> int | None:
    return None if spec.option(key) is None else int(_number(spec, key, 0, minimum=1))


def _optional_bool(spec: BackendSpec, key: str) -> bool | None:
    value = spec.option(key)
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    msg = f"option {key} of the openai backend must be true or false, got {value!r}"
    raise ConfigError(msg)


def _choice(spec: BackendSpec, key: str, choices: tuple[str, ...], default: str) -> str:
    value = str(spec.option(key, default))
    if value not in choices:
        msg = (
            f"option {key}={value!r} of the openai backend must be one of "
            f"{', '.join(choices)}"
        )
        raise ConfigError(msg)
    return value


# ---- rate limits ------------------------------------------------------------------------------


class _Bucket:
    """A token bucket refilled at ``per_minute / 60`` per second, holding one second's worth.

    A take larger than the bucket waits for a full bucket and leaves it in debt, so big
    requests are delayed rather than refused.
    """

    def __init__(self, per_minute: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    async def take(self, amount: float) -> None:
        async with self.lock:
            need = min(amount, self.capacity)
            self._refill()
            while self.level < need:
                await asyncio.sleep((need - self.level) / self.rate)
                self._refill()
            self.level -= amount

    def give_back(self, amount: float) -> None:
        """Correct an estimate (a negative amount takes more)."""
        self.level = min(self.capacity, self.level + amount)


# ---- one attempt's outcome -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What one HTTP attempt gave: an answer, a retryable problem, a final or fatal error."""

    label: str
    """``ok``, ``http 429``, ``timeout``, ``connection``, ``malformed``..."""
    status: int | None = None
    response: Response | None = None
    retry: bool = False
    retry_after: float | None = None
    error: str | None = None
    fatal: bool = False


_GAUGE = re.compile(r"^vllm:cache_config_info\{([^}]*)\}", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def cache_config_labels(metrics: str) -> dict[str, str]:
    """The labels of vLLM's ``vllm:cache_config_info`` gauge in a Prometheus text page.

    >>> cache_config_labels('vllm:cache_config_info{block_size="128",num_gpu_blocks="90"} 1.0')
    {'block_size': '128', 'num_gpu_blocks': '90'}
    """
    m = _GAUGE.search(metrics)
    return dict(_LABEL.findall(m.group(1))) if m else {}


def _int_label(labels: dict[str, str], key: str) -> int | None:
    try:
        value = int(labels.get(key, ""))
    except ValueError:
        return None
    return value if value > 0 else None


def _cache_tokens(labels: dict[str, str]) -> int | None:
    """The engine's KV-cache capacity in tokens (blocks x block size), when it says."""
    blocks, size = _int_label(labels, "num_gpu_blocks"), _int_label(labels, "block_size")
    return blocks * size if blocks and size else None


def _retry_after(headers: httpx.Headers) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return None if parsed is None else max(0.0, parsed.timestamp() - time.time())


def _server_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        msg = body.get("error", {}).get("message") if isinstance(body, dict) else None
    except ValueError:
        msg = None
    text = str(msg) if msg else resp.text
    return " ".join(text.split())[:MAX_ERROR_TEXT]


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _first_token_logprobs(choice: Any, endpoint: str) -> list[tuple[str, float]]:
    """The first answer token and its top alternatives with their log-probabilities, from a
    reply choice's ``logprobs`` (chat: ``content[0]`` and its ``top_logprobs``; completions:
    ``tokens``/``token_logprobs`` and ``top_logprobs[0]``); [] where there are none.

    >>> _first_token_logprobs({"logprobs": {"content": [{"token": "Yes", "logprob": -0.1,
    ...     "top_logprobs": [{"token": "No", "logprob": -2.5}]}]}}, "chat")
    [('Yes', -0.1), ('No', -2.5)]
    >>> _first_token_logprobs({"logprobs": {"tokens": ["No"], "token_logprobs": [-0.2],
    ...     "top_logprobs": [{"Yes": -1.7}]}}, "completions")
    [('No', -0.2), ('Yes', -1.7)]
    >>> _first_token_logprobs({"logprobs": None}, "chat")
    []
    """
    try:
        logprobs = choice["logprobs"]
        if endpoint == "chat":
            first = logprobs["content"][0]
            pairs = [(first["token"], first["logprob"])] + [
                (t["token"], t["logprob"]) for t in first.get("top_logprobs") or ()]
        else:
            pairs = [(logprobs["tokens"][0], logprobs["token_logprobs"][0])] + list(
                (logprobs.get("top_logprobs") or [{}])[0].items())
        return [(str(t), float(lp)) for t, lp in pairs if lp is not None]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return []


def no_adapter_message(name: str, /) -> str:
    """The error of a request with a LoRA adapter: the ``openai`` backend never sends one.

    A remote server's adapters cannot be checked against the catalog's weights (their
    digest), so answering ``adapter => 'x'`` with whatever the server calls ``x`` could
    silently use other weights.

    >>> no_adapter_message("fresh")  # doctest: +ELLIPSIS
    "adapter 'fresh': the openai backend does not run LoRA adapters; ..."
    """
    return (f"adapter {name!r}: the openai backend does not run LoRA adapters; run the call "
            "on the vllm or transformers backend, or serve the adapter as its own model "
            "(e.g. vllm serve --lora-modules) and name that model in the call's model => ...")


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


# ---- the backend ------------------------------------------------------------------------------


class OpenAIBackend:
    """The :class:`~llmsql.backends.base.LLMBackend` for OpenAI-compatible servers.

    The server is contacted only when something needs it (module docstring): a request, a
    token count, ``capabilities``, or ``model`` when no model is named.
    """

    name = "openai"

    def __init__(self, spec: BackendSpec, /) -> None:
        """Validate the options and prepare the connection pool; the server is not contacted
        until something needs it (see :meth:`_discover`).

        Raises:
            ConfigError: a bad option.
        """
        import httpx

        self._httpx = httpx
        self.config = OpenAIConfig.from_spec(spec)
        self._rng = random.Random()
        self._log_lock = threading.Lock()
        self._log = open(self.config.request_log, "a", encoding="utf-8") \
            if self.config.request_log else None  # noqa: SIM115 (closed in close())
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="llmsql-openai")
        self._thread.start()
        self._closed = False
        self._give_ups = 0
        self._info: dict[str, Any] | None = None
        self._name = self.config.model
        self._discover_lock = threading.Lock()
        self._mode = "none"
        self._caps = Capabilities()
        self._tokenize = False
        try:
            self._run(self._start())
        except BaseException:
            self.close()
            raise

    @property
    def model(self) -> str:
        """The model's name: as named, else the one the server serves (asked on first use)."""
        if self._name is None:
            self._name = str(self._discover()["id"])
        return self._name

    @property
    def capabilities(self) -> Capabilities:
        """What the server supports for the model (its model list is read on first use)."""
        self._discover()
        return self._caps

    # -- event loop plumbing ------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the backend's loop and wait; Ctrl-C cancels it."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            raise

    async def _start(self) -> None:
        cfg = self.config
        headers = {"User-Agent": "llmsql"}
        if cfg.api_key is not None:
            headers["Authorization"] = f"Bearer {cfg.api_key.reveal()}"
        limits = self._httpx.Limits(max_connections=cfg.concurrency,
                                    max_keepalive_connections=cfg.concurrency)
        self._client = self._httpx.AsyncClient(
            base_url=cfg.base_url, headers=headers, limits=limits,
            timeout=self._httpx.Timeout(cfg.timeout, connect=min(cfg.timeout, 10.0)),
        )
        self._sem = asyncio.Semaphore(cfg.concurrency)
        self._rpm = _Bucket(cfg.rpm) if cfg.rpm else None
        self._tpm = _Bucket(cfg.tpm) if cfg.tpm else None

    # -- discovery --------------------------------------------------------------------------

    def _discover(self) -> dict[str, Any]:
        """The server's entry for the model, read once, on first need.

        Raises:
            ConfigError: no model named and the server serves none or several.
            BackendError: the server cannot be reached, or refuses the key (the next use
                tries again).
        """
        with self._discover_lock:
            if self._info is None:
                if self._closed:
                    msg = "the openai backend is closed; build a new one"
                    raise BackendError(msg,
                                       backend=self.name)
                info = self._run(self._pick_model())
                self._mode = self._structured_mode(info)
                engine = self._run(self._engine_cache()) if info.get("owned_by") == "vllm" \
                    else {}
                self._caps = self._capabilities(info, engine)
                self._tokenize = info.get("owned_by") in ("vllm", "llmsql")
                self._info = info
            return self._info

    async def _pick_model(self) -> dict[str, Any]:
        hint = "" if self.config.model is not None else (
            "; no model is named, so the server is asked which one it serves even when every "
            "answer is in the result cache: name it (--model NAME / model=...) to re-run "
            "cached queries without the server"
        )
        data = await self._call_json("GET", "/models", None, purpose="listing models",
                                     hint=hint)
        models = [m for m in data.get("data", []) if isinstance(m, dict) and "id" in m] \
            if isinstance(data, dict) else []
        wanted = self.config.model
        for m in models:
            if m["id"] == wanted:
                return m
        if wanted is not None:
            return {"id": wanted}  # hosted APIs may not list every model they serve
        if len(models) == 1:
            return models[0]
        if not models:
            msg = (
                f"found no models at {self.config.shown_url}/models; check the base URL (it "
                "usually ends in /v1), or name the model with --model / model=..."
            )
            raise ConfigError(msg)
        names = ", ".join(str(m["id"]) for m in models)
        msg = (
            f"the server at {self.config.shown_url} serves {len(models)} models ({names}); "
            "name one with --model / model=..."
        )
        raise ConfigError(msg)

    def _structured_mode(self, info: dict[str, Any]) -> str:
        if self.config.structured != "auto":
            return self.config.structured
        return "structured_outputs" if info.get("owned_by") in ("vllm", "llmsql") else "none"

    async def _engine_cache(self) -> dict[str, str]:
        """VLLM's cache configuration from its ``/metrics`` gauge ``vllm:cache_config_info``
        (labels such as ``block_size`` and ``num_gpu_blocks``); {} where it cannot be read.
        One attempt: the figures refine planning, nothing depends on them.
        """
        root = self.config.base_url.removesuffix("/v1")
        try:
            resp = await self._client.get(f"{root}/metrics")
            text = (await resp.aread()).decode("utf-8", "replace")
        except self._httpx.HTTPError:
            return {}
        return cache_config_labels(text) if resp.status_code == 200 else {}

    def _capabilities(self, info: dict[str, Any], engine: dict[str, str]) -> Capabilities:
        reported = info.get("llmsql_capabilities") or {}
        server_len = info.get("max_model_len") or reported.get("max_model_len")
        mode = self._mode
        choice = mode in ("structured_outputs", "guided") and reported.get(
            "constrained_choice", True)
        schema = mode != "none" and reported.get("json_schema", True)
        return Capabilities(
            prefix_caching=bool(reported.get("prefix_caching", True)),
            constrained_choice=bool(choice),
            json_schema=bool(schema),
            max_model_len=int(self.config.max_model_len or server_len or DEFAULT_MAX_MODEL_LEN),
            reports_cached_tokens=bool(reported.get("reports_cached_tokens",
                                                    info.get("owned_by") == "vllm")),
            block_size=int(self.config.block_size or reported.get("block_size")
                           or _int_label(engine, "block_size") or 16),
            cache_tokens=_cache_tokens(engine),
            batch_prefix_sharing=bool(
                self.config.prefix_sharing if self.config.prefix_sharing is not None
                else info.get("owned_by") == "vllm"),
            concurrent_requests=self.config.concurrency,
            choice_probabilities=self._logprobs_supported(info, reported),
        )

    def _logprobs_supported(self, info: dict[str, Any], reported: dict[str, Any]) -> bool:
        """Whether the server returns log-probabilities (the ``choice_probs`` option, else
        vLLM yes, ``llmsql serve`` as it says, others no).
        """
        if self.config.choice_probs is not None:
            return self.config.choice_probs
        owner = info.get("owned_by")
        return owner == "vllm" or (owner == "llmsql"
                                   and bool(reported.get("choice_probabilities", False)))

    # -- the protocol ------------------------------------------------------------------------

    def generate(self, batch: Sequence[Request], /) -> list[Response]:
        """Answer every request (concurrently); one Response per request, in input order.

        A request that still fails after its retries gets ``Response.error``.

        Raises:
            BackendError: the server refused the key (401/403), the URL or model does not
                exist (404), or the backend is closed.
        """
        if self._closed:
            msg = "the openai backend is closed; build a new one"
            raise BackendError(msg, backend=self.name)
        self._discover()
        return self._run(self._generate_all(list(batch)))

    async def _generate_all(self, batch: list[Request]) -> list[Response]:
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._answer(r)) for r in batch]
        except BaseExceptionGroup as failed:  # a fatal error cancelled the others
            raise _first_leaf(failed) from None
        return [t.result() for t in tasks]

    def count_tokens(self, text: str, /) -> int:
        """Tokens of ``text`` with the chat template, from the server's ``/tokenize`` if it
        has one, else estimated (3 bytes per token plus 16 for the template).
        """
        if not self._closed:
            self._discover()
        if self._tokenize and not self._closed:
            with contextlib.suppress(BackendError):
                count = self._run(self._count(text))
                if count is not None:
                    return count
        return len(text.encode("utf-8")) // 3 + 16

    async def _count(self, text: str) -> int | None:
        body: dict[str, Any] = {"model": self.model}
        if self.config.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        root = self.config.base_url.removesuffix("/v1")
        data = await self._call_json("POST", f"{root}/tokenize", body, purpose="tokenize")
        count = data.get("count") if isinstance(data, dict) else None
        return count if isinstance(count, int) else None

    def model_id(self) -> str:
        """``openai:<base url without credentials>:<model>`` (no server needed when the model
        is named).
        """
        return f"openai:{self.config.shown_url}:{self.model}"

    def close(self) -> None:
        """Close the connections and stop the event loop thread."""
        if self._closed:
            return
        self._closed = True
        client = getattr(self, "_client", None)
        if client is not None and self._loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(client.aclose(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()
        if self._log is not None:
            self._log.close()

    # -- one request ---------------------------------------------------------------------------

    def _body(self, req: Request) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": req.max_tokens,
                                "temperature": req.temperature}
        if self.config.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": req.prompt}]
        else:
            body["prompt"] = req.prompt
        if req.seed is not None:
            body["seed"] = req.seed
        if req.ignore_eos:
            body["ignore_eos"] = True
        if req.choices and self._mode == "structured_outputs":
            body["structured_outputs"] = {"choice": list(req.choices)}
        elif req.choices and self._mode == "guided":
            body["guided_choice"] = list(req.choices)
        if req.json_schema and self._mode != "none":
            schema = {"name": "llmsql", "schema": json.loads(req.json_schema)}
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
        if self._scores(req) and self.config.endpoint == "chat":
            body["logprobs"], body["top_logprobs"] = True, TOP_LOGPROBS
        elif self._scores(req):
            body["logprobs"] = TOP_LOGPROBS
        return body

    def _scores(self, req: Request) -> bool:
        """Whether ``req`` gets choice probabilities (asked for, and the server can)."""
        return bool(req.choice_probs and req.choices and self._caps.choice_probabilities)

    async def _answer(self, req: Request) -> Response:
        if req.adapter is not None:
            return Response("", error=no_adapter_message(req.adapter.name))
        body = self._body(req)
        path = "/chat/completions" if self.config.endpoint == "chat" else "/completions"
        rid = uuid.uuid4().hex[:16]
        digest = _sha256(req.prompt)
        estimate = len(req.prompt.encode("utf-8")) / 4 + req.max_tokens
        last = "no attempt"
        for attempt in range(self.config.max_retries + 1):
            await self._throttle(estimate)
            started = time.time()
            async with self._sem:
                outcome = await self._attempt(path, body, f"{rid}-{attempt}",
                                              req.choices if self._scores(req) else None)
            self._record(rid, attempt, digest, outcome, started)
            if outcome.response is not None:
                self._correct_tpm(estimate, outcome.response)
                self._give_ups = 0
                return outcome.response
            if outcome.fatal:
                raise BackendError(outcome.error or outcome.label, backend=self.name)
            if not outcome.retry:
                return Response("", error=outcome.error or outcome.label)
            last = outcome.error or outcome.label
            if attempt < self.config.max_retries:
                await asyncio.sleep(self._delay(attempt, outcome.retry_after))
        return self._give_up(last)

    def _give_up(self, last: str) -> Response:
        """This request failed for good; many in a row mean the server is down: stop."""
        self._give_ups += 1
        message = f"gave up after {self.config.max_retries + 1} attempts; last: {last}"
        if self._give_ups >= max(GIVE_UPS_TO_STOP, 2 * self.config.concurrency):
            msg = (
                f"{self._give_ups} requests in a row to {self.config.shown_url} failed for good "
                f"({message}); check that the server is up, or raise max_retries/timeout"
            )
            raise BackendError(
                msg,
                backend=self.name,
            )
        return Response("", error=message)

    async def _throttle(self, estimate: float) -> None:
        if self._rpm is not None:
            await self._rpm.take(1)
        if self._tpm is not None:
            await self._tpm.take(estimate)

    def _correct_tpm(self, estimate: float, resp: Response) -> None:
        if self._tpm is not None and (resp.prompt_tokens or resp.output_tokens):
            self._tpm.give_back(estimate - resp.prompt_tokens - resp.output_tokens)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with "equal jitter"; at least ``Retry-After`` (capped)."""
        cfg = self.config
        base = min(cfg.max_backoff, cfg.backoff * 2.0**attempt)
        delay = base / 2 + self._rng.uniform(0, base / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, cfg.max_retry_after))
        return delay

    async def _attempt(self, path: str, body: dict[str, Any], attempt_id: str,
                       choices: tuple[str, ...] | None = None) -> _Outcome:
        """One HTTP attempt; with ``choices``, the reply's log-probabilities give their
        probabilities.
        """
        httpx = self._httpx
        try:
            resp = await self._client.post(path, json=body, headers={"X-Request-Id": attempt_id})
            content = await resp.aread()
        except httpx.TimeoutException:
            return _Outcome("timeout", retry=True,
                            error=f"no answer within {self.config.timeout:g} s")
        except httpx.TransportError as exc:
            return _Outcome("connection", retry=True, error=f"connection failed: "
                            f"{type(exc).__name__}")
        return self._classify(resp, content, choices)

    def _classify(self, resp: httpx.Response, content: bytes,
                  choices: tuple[str, ...] | None = None) -> _Outcome:
        status = resp.status_code
        where = f"{self.config.shown_url}"
        if status == 200:
            return self._parse_ok(content, choices)
        message = _server_message(resp)
        if status in RETRY_STATUS or status >= 500:
            return _Outcome(f"http {status}", status, retry=True,
                            retry_after=_retry_after(resp.headers),
                            error=f"HTTP {status} from {where}: {message}")
        if status in FATAL_STATUS:
            return _Outcome(f"http {status}", status, fatal=True, error=self._fatal(status,
                                                                                   message))
        return _Outcome(f"http {status}", status, error=f"HTTP {status} from {where}: {message}")

    def _fatal(self, status: int, message: str) -> str:
        url = self.config.shown_url
        if status in (401, 403):
            return (f"the server at {url} refused the request (HTTP {status}: {message}); set "
                    f"${self.config.api_key_env} to a valid API key (or --api-key-env NAME)")
        return (f"HTTP 404 from {url} ({message}); check the base URL (it usually ends in /v1) "
                f"and the model name {self.model!r}")

    def _parse_ok(self, content: bytes, choices: tuple[str, ...] | None = None) -> _Outcome:
        try:
            data = json.loads(content)
            choice = data["choices"][0]
            text = choice["message"]["content"] if self.config.endpoint == "chat" \
                else choice["text"]
            usage = data.get("usage") or {}
            if not isinstance(text, str) or not isinstance(usage, dict):
                msg = "no text"
                raise TypeError(msg)
            prompt_tokens = int(usage.get("prompt_tokens") or 0)
            output_tokens = int(usage.get("completion_tokens") or 0)
            details = usage.get("prompt_tokens_details")
            reported = isinstance(details, dict) and details.get("cached_tokens") is not None
            cached = int(details["cached_tokens"]) if reported else 0  # type: ignore[index]
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            return _Outcome("malformed", 200, retry=True,
                            error=f"malformed reply ({type(exc).__name__})")
        probs = None if choices is None else from_top_logprobs(
            _first_token_logprobs(choice, self.config.endpoint), choices)
        return _Outcome("ok", 200, Response(text, prompt_tokens=prompt_tokens,
                                            cached_tokens=cached, output_tokens=output_tokens,
                                            cached_reported=reported, choice_probs=probs))

    async def _call_json(self, method: str, path: str, body: dict[str, Any] | None, *,
                         purpose: str, hint: str = "") -> Any:
        """A non-generation call (models, tokenize), retried like generation; ``hint`` ends
        the message when the server cannot be reached.
        """
        last = ""
        for attempt in range(self.config.max_retries + 1):
            try:
                resp = await self._client.request(method, path, json=body)
                content = await resp.aread()
            except self._httpx.TransportError as exc:
                last = f"{type(exc).__name__}"
            else:
                if resp.status_code == 200:
                    try:
                        return json.loads(content)
                    except ValueError:
                        last = "malformed reply"
                elif resp.status_code in FATAL_STATUS and resp.status_code != 404:
                    raise BackendError(self._fatal(resp.status_code, _server_message(resp)),
                                       backend=self.name)
                elif resp.status_code < 500 and resp.status_code not in RETRY_STATUS:
                    return {}
                else:
                    last = f"HTTP {resp.status_code}"
            if attempt < self.config.max_retries:
                await asyncio.sleep(self._delay(attempt, None))
        msg = (
            f"cannot reach the OpenAI-compatible server at {self.config.shown_url} "
            f"({purpose}: {last}); check --base-url and that the server is running{hint}"
        )
        raise BackendError(
            msg,
            backend=self.name,
        )

    def _record(self, rid: str, attempt: int, digest: str, outcome: _Outcome,
                started: float) -> None:
        if outcome.retry:
            logger.info("request %s attempt %d: %s; retrying", rid, attempt, outcome.label)
        if self._log is None:
            return
        answer = outcome.response.text if outcome.response is not None else None
        line = json.dumps({
            "request": rid, "attempt": attempt, "attempt_id": f"{rid}-{attempt}",
            "prompt_sha256": digest, "outcome": outcome.label, "status": outcome.status,
            "started": started, "t": time.time(),
            "answer_sha256": None if answer is None else _sha256(answer),
        })
        with self._log_lock:
            self._log.write(line + "\n")
            self._log.flush()
