"""The persistent result cache: answers paid for once are never paid for again.

One SQLite file in WAL mode (``$XDG_CACHE_HOME/llmsql/results.sqlite`` by default, created
readable by its owner only) maps a hash of *(model identity, request options, rendered
prompt)* to the model's raw answer text. Several processes may read and write it at once
(SQLite's WAL locking; writers wait for each other with a busy timeout), so Spark executors
and parallel jobs can share one file. They must run on one host: WAL coordinates through
shared memory, which network filesystems do not provide, so on a multi-host cluster each
host keeps its own file at the same path (see the README, "Running on a cluster").

What is stored, and what is not:

- only answers to reproducible requests (temperature 0, or a fixed seed);
- never a failed request (a :class:`~llmsql.backends.base.Response` with ``error`` set);
- never a prompt's text or an API key: rows are keyed by a SHA-256 digest;
- the raw answer, not the parsed value, so parsing rules may change without a flush.

The executor writes each batch's answers as soon as the batch returns, so a query killed
mid-way loses at most the batches that were in flight; running it again answers the rest
from here. :class:`LazyBackend` lets a query whose answers are all cached run without
building (loading) the backend at all: the model's identity comes from the spec
(:func:`model_key`), and its capabilities from the first run that did build it. Nothing else
reaches the backend on such a re-run: prompt-cache warm-ups are sent only ahead of prompts
that are sent, and a long prompt answered before is known to fit the context without
counting its tokens. What still needs the backend: an ``openai`` spec that names no model
(the server says which model it serves), and prompts that must be truncated
(``truncate => true``) or packed into LLM_AGG chunks by token count, which the model's
tokenizer measures.

>>> import tempfile, pathlib
>>> from llmsql.backends.base import Request, Response
>>> cache = ResultCache(pathlib.Path(tempfile.mkdtemp()) / "r.sqlite")
>>> key = request_key("m", Request("Hi?", max_tokens=4))
>>> cache.put_many([(key, "m", Response("Hello", prompt_tokens=3, output_tokens=2))])
1
>>> cache.get_many([key])[key].text
'Hello'
>>> cache.close()
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import random
import sqlite3
import threading
import time
from typing import TYPE_CHECKING, Any

from llmsql.backends.base import BackendSpec, Capabilities, LLMBackend, Request, Response
from llmsql.backends.credentials import strip_credentials
from llmsql.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

logger = logging.getLogger(__name__)

CACHE_FILE_NAME = "results.sqlite"
SCHEMA_VERSION = 1
"""Stored in ``PRAGMA user_version``; a file from a newer llmsql is refused, not rewritten."""

KEY_VERSION = 1
"""Part of every request key: bump it when the meaning of a key changes."""

BUSY_TIMEOUT_MS = 60_000
"""How long a writer waits for another process's write transaction."""

LOOKUP_CHUNK = 500
"""Keys per ``SELECT ... IN (...)`` (SQLite's default limit on parameters is far above)."""

OPERATIONAL_OPTIONS: frozenset[str] = frozenset(
    {
        # how a backend runs, never what it answers
        "api_key", "api_key_env", "backoff", "batch_size", "cache_dir", "concurrency",
        "connect_timeout", "enforce_eager", "gpu_memory_utilization", "idle_timeout",
        "kv_cache_space_gb", "max_backoff", "max_retries", "max_retry_after", "request_log",
        "rpm", "socket_path", "startup_timeout", "threads", "timeout", "tpm", "base_url",
        # where a mixture-of-experts model's experts live and how they are fetched
        # (llmsql.moe.options.OPTION_NAMES): the same computation, the same answers
        "expert_cache", "moe_plan", "predictor", "lookahead", "moe_profile",
    }
)
"""Spec options left out of :func:`model_key`; every other option is part of the identity."""


# ---- identities -------------------------------------------------------------------------------


def default_cache_path() -> pathlib.Path:
    """Return ``$XDG_CACHE_HOME/llmsql/results.sqlite`` (``~/.cache`` when unset)."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache"
    return base / "llmsql" / CACHE_FILE_NAME


def model_key(spec: BackendSpec, /) -> str | None:
    """A stable identity of the model a spec names, computed without loading it.

    Local models (``transformers``, ``vllm``) are identified by their folder, the hash of
    ``config.json`` and the names, sizes and modification times of their weight files (the
    embedded model by its GGUF file, so no conversion is needed); ``openai`` models by the
    server URL (without credentials) and the model name. Options that change answers (dtype,
    max_model_len...) are part of the identity; operational ones (threads, timeouts, keys)
    are not.

    Args:
        spec: The backend spec.

    Returns:
        The identity, or None when it cannot be known without building the backend (an
        ``openai`` spec that names no model: the server picks it).

    Raises:
        ConfigError: the model folder does not exist.
    """
    if spec.kind == "openai":
        if spec.model is None:
            return None
        base = _model_base_url(spec)
        where = f"openai:{base}:{spec.model}"
    elif spec.kind in ("transformers", "vllm"):
        where = f"{spec.kind}:{_local_model_identity(spec.model)}"
    else:
        where = f"{spec.kind}:{spec.model}"
    options = {k: _plain(v) for k, v in spec.options if k not in OPERATIONAL_OPTIONS}
    return where + (":" + json.dumps(options, sort_keys=True) if options else "")


def _model_base_url(spec: BackendSpec) -> str:
    return strip_credentials(str(spec.option("base_url") or "")).rstrip("/")


def _local_model_identity(name: str | None) -> str:
    from llmsql.models import EMBEDDED_MODEL_NAMES, embedded_gguf_path, resolve_model

    if name is None or name in EMBEDDED_MODEL_NAMES:
        gguf = embedded_gguf_path()
        return f"embedded:{gguf.name}:{gguf.stat().st_size}"
    path = resolve_model(name)
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        st = weights.stat()
        digest.update(f"{weights.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{path}:{digest.hexdigest()[:16]}"


def _plain(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)


def reproducible(req: Request, /) -> bool:
    """Whether ``req`` always gets the same answer: temperature 0 or a fixed seed.

    >>> reproducible(Request("x")), reproducible(Request("x", temperature=0.7))
    (True, False)
    """
    return req.temperature <= 0 or req.seed is not None


def request_key(model: str, req: Request, /) -> bytes:
    """The cache key of ``req`` sent to ``model``: a SHA-256 digest of everything that
    determines the answer (the prompt's text is not stored anywhere).
    """
    seed = req.seed if req.temperature > 0 else None
    payload = [KEY_VERSION, model, req.prompt, req.max_tokens, req.temperature, seed,
               list(req.choices) if req.choices is not None else None, req.json_schema,
               req.ignore_eos]
    if req.choice_probs:  # asked for probabilities: another answer (keys without it unchanged)
        payload.append("choice_probs")
    if req.adapter is not None:  # a LoRA adapter: its weights' digest (keys without unchanged)
        payload.append(["adapter", req.adapter.digest])
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode("utf-8")).digest()


# ---- the store ----------------------------------------------------------------------------------

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS answers (
        key BLOB PRIMARY KEY, model TEXT NOT NULL, text TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, created REAL NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS backends (
        model TEXT PRIMARY KEY, capabilities TEXT NOT NULL, created REAL NOT NULL
    )""",
)


class ResultCache:
    """The result cache file: thread-safe, shared by processes, pickled by its path."""

    def __init__(self, path: str | os.PathLike[str], /) -> None:
        """Use (and create, on first write or read) the cache file at ``path``.

        Nothing is opened until the first lookup, so a session that never sends a prompt
        leaves no file behind.
        """
        self.path = pathlib.Path(path).expanduser()
        self._con: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self.write_errors = 0

    def __reduce__(self) -> tuple[type[ResultCache], tuple[str]]:
        return (ResultCache, (str(self.path),))

    def __repr__(self) -> str:
        return f"ResultCache({str(self.path)!r})"

    # -- opening ---------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._con is None:
            _create_private_file(self.path)
            deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
            while True:
                con = None
                try:
                    con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000,
                                          isolation_level=None, check_same_thread=False)
                    self._init_schema(con)
                    break
                except sqlite3.DatabaseError as exc:
                    if con is not None:
                        con.close()
                    # switching a new file to WAL takes an exclusive lock that SQLite does not
                    # wait for: processes opening it at once (Spark tasks) retry
                    if _locked(exc) and time.monotonic() < deadline:
                        time.sleep(0.02 + random.random() * 0.08)
                        continue
                    msg = (
                        f"the result cache {str(self.path)!r} cannot be used: {exc}; delete "
                        "the file (it only holds answers that can be recomputed) or pass "
                        "cache=False"
                    )
                    raise ConfigError(msg) from None
            self._con = con
        return self._con

    @staticmethod
    def _init_schema(con: sqlite3.Connection) -> None:
        con.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        con.execute("PRAGMA journal_mode = WAL").fetchall()
        con.execute("PRAGMA synchronous = NORMAL")
        version = con.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            msg = f"it was written by a newer llmsql (schema {version} > {SCHEMA_VERSION})"
            raise sqlite3.DatabaseError(msg)
        if version == SCHEMA_VERSION:
            return
        con.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                con.execute(statement)
            con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def open(self) -> None:
        """Open (and create) the file now rather than on first use.

        Raises:
            ConfigError: the file cannot be created or is not a usable cache.
            sqlite3.OperationalError: another process held it locked for longer than
                :data:`BUSY_TIMEOUT_MS`.
        """
        with self._lock:
            self._connect()

    def close(self) -> None:
        """Close the file (it is reopened on the next use)."""
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None

    # -- answers -------------------------------------------------------------------------------

    def get_many(self, keys: Sequence[bytes], /) -> dict[bytes, Response]:
        """The cached answers among ``keys`` (missing keys are absent from the result)."""
        out: dict[bytes, Response] = {}
        unique = list(dict.fromkeys(keys))
        with self._lock:
            con = self._connect()
            for lo in range(0, len(unique), LOOKUP_CHUNK):
                chunk = unique[lo : lo + LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = con.execute(
                    "SELECT key, text, prompt_tokens, output_tokens FROM answers "
                    f"WHERE key IN ({marks})", chunk,
                ).fetchall()
                for key, text, prompt_tokens, output_tokens in rows:
                    out[bytes(key)] = Response(text, prompt_tokens=prompt_tokens,
                                               output_tokens=output_tokens)
        return out

    def put_many(self, items: Iterable[tuple[bytes, str, Response]], /) -> int:
        """Store successful answers in one transaction; return how many rows were new.

        Responses with ``error`` set are skipped: failures are never cached.
        """
        now = time.time()
        rows = [(k, model, r.text, r.prompt_tokens, r.output_tokens, now)
                for k, model, r in items if r.error is None]
        if not rows:
            return 0
        with self._lock:
            con = self._connect()
            before = con.total_changes
            con.execute("BEGIN IMMEDIATE")
            try:
                con.executemany("INSERT OR IGNORE INTO answers VALUES (?, ?, ?, ?, ?, ?)", rows)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            return con.total_changes - before

    def __len__(self) -> int:
        with self._lock:
            return int(self._connect().execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def clear(self) -> None:
        """Forget every answer and capability."""
        with self._lock:
            con = self._connect()
            con.execute("DELETE FROM answers")
            con.execute("DELETE FROM backends")

    # -- capabilities ------------------------------------------------------------------------

    def capabilities(self, model: str, /) -> Capabilities | None:
        """The capabilities recorded for ``model`` the last time it was built, if any."""
        with self._lock:
            row = self._connect().execute(
                "SELECT capabilities FROM backends WHERE model = ?", (model,)
            ).fetchone()
        if row is None:
            return None
        try:
            return Capabilities(**json.loads(row[0]))
        except (TypeError, ValueError):
            return None  # written by a version with other fields: rebuild and overwrite

    def put_capabilities(self, model: str, caps: Capabilities, /) -> None:
        """Record ``model``'s capabilities (replacing older ones)."""
        text = json.dumps(dataclasses.asdict(caps), sort_keys=True)
        with self._lock:
            self._connect().execute(
                "INSERT OR REPLACE INTO backends VALUES (?, ?, ?)", (model, text, time.time())
            )


def _locked(exc: sqlite3.DatabaseError) -> bool:
    """Whether ``exc`` is SQLite's "database is locked" / "busy" (another process holds it)."""
    return isinstance(exc, sqlite3.OperationalError) and any(
        w in str(exc).lower() for w in ("locked", "busy"))


def _create_private_file(path: pathlib.Path) -> None:
    """Create ``path`` (and its folder) readable and writable by the owner only.

    SQLite gives its ``-wal`` and ``-shm`` files the database file's permissions.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
    except OSError as exc:
        msg = (
            f"cannot create the result cache {str(path)!r}: {exc.strerror}; pass "
            "cache='/a/writable/file.sqlite' or cache=False"
        )
        raise ConfigError(msg) from None


# ---- answering without building the backend -------------------------------------------------


class LazyBackend:
    """A spec's backend, built on first real use.

    It knows the model's identity (:func:`model_key`) and, once any run has built the
    backend, its capabilities (kept in the cache), so a query answered entirely from the
    cache never builds it. ``generate`` and ``count_tokens`` build it; ``contacts`` counts
    what reached the real backend (a build, a ``generate``, a ``count_tokens``).
    """

    def __init__(self, spec: BackendSpec, build: Callable[[], LLMBackend],
                 cache: ResultCache | None) -> None:
        """Wrap ``build`` (called at most once, on first need) for ``spec``."""
        self.name = spec.kind
        self._spec = spec
        self._build = build
        self._cache = cache
        self._backend: LLMBackend | None = None
        self._key: str | None = None
        self.contacts = 0
        """Builds of the real backend plus calls of its ``generate`` and ``count_tokens``."""

    @property
    def built(self) -> bool:
        """Whether the real backend has been built."""
        return self._backend is not None

    def backend(self) -> LLMBackend:
        """The real backend (built now if needed; its capabilities are then recorded)."""
        if self._backend is None:
            self.contacts += 1
            self._backend = self._build()
            if self._cache is not None:
                try:
                    self._cache.put_capabilities(self.model_id(), self._backend.capabilities)
                except sqlite3.Error as exc:
                    logger.warning("could not record capabilities in %s: %s",
                                   self._cache.path, exc)
        return self._backend

    @property
    def capabilities(self) -> Capabilities:
        """Recorded capabilities when known, else the built backend's."""
        if self._backend is None and self._cache is not None:
            caps = self._cache.capabilities(self.model_id())
            if caps is not None:
                return caps
        return self.backend().capabilities

    def model_id(self) -> str:
        """The spec's :func:`model_key` (the built backend's ``model_id`` when unknowable)."""
        if self._key is None:
            self._key = model_key(self._spec) or self.backend().model_id()
        return self._key

    def generate(self, batch: Sequence[Request], /) -> list[Response]:
        """Generate with the real backend."""
        backend = self.backend()
        self.contacts += 1
        return backend.generate(batch)

    def count_tokens(self, text: str, /) -> int:
        """Count with the real backend."""
        backend = self.backend()
        self.contacts += 1
        return backend.count_tokens(text)

    def close(self) -> None:
        """Nothing: the session owns and closes the real backend."""
