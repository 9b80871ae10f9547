"""SessionConfig: a session's settings as one frozen, validated value.

:func:`llmsql.connect` takes these settings as keywords and builds the config once;
:class:`llmsql.session.Session` takes the config. Every field is checked when the value is
made, so a bad setting fails at ``connect()`` with a message saying which one and how to
fix it, before any engine starts. Derive a variant with :func:`dataclasses.replace`.

What the config does not decide is read from the environment once, when a session opens:
:func:`resolve_cache_path` (``$LLMSQL_CACHE``) and :func:`resolve_backend_options`
(``$OPENAI_BASE_URL``).

>>> import dataclasses
>>> cfg = SessionConfig(dry_run=True, budget={"max_calls": 10}, on_error="FAIL")
>>> cfg.budget.max_calls, cfg.on_error
(10, 'fail')
>>> dataclasses.replace(cfg, optimize=False).settings.budget == cfg.budget
True
>>> SessionConfig(batch_size=0)
Traceback (most recent call last):
...
llmsql.errors.ConfigError: batch_size=0: ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from llmsql.backends import BACKENDS, LLMBackend, moe_glue
from llmsql.budget import Budget, OnError, Price, Settings, apply_setting
from llmsql.cache import default_cache_path
from llmsql.errors import ConfigError

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Everything :func:`llmsql.connect` takes, checked (the fields are its keywords)."""

    backend: str | LLMBackend | None = None
    """``transformers``, ``vllm`` or ``openai``; None: ``vllm`` when installed with a GPU
    present, else ``transformers``. An object implementing the ``LLMBackend`` protocol is
    used as it is (the session does not close it)."""
    model: str | None = None
    """A local Hugging Face model folder, or None / ``smollm2`` for the embedded model."""
    database: str | os.PathLike[str] = ":memory:"
    """A DuckDB database file, or ``:memory:``."""
    engine: str = "duckdb"
    """``duckdb`` (embedded) or ``spark`` (checked against ``llmsql.executors.EXECUTORS``
    when the session builds it)."""
    spark: Any = None
    """For ``engine='spark'``: a SparkSession (classic or Connect) or a master URL."""
    progress: bool | None = None
    """Show a progress bar (None: when stderr is a terminal)."""
    optimize: bool = True
    """Reorder rows, fields and LLM filters for prefix-cache reuse and fewer prompts."""
    warm_prefixes: bool = True
    """On engines that run requests concurrently, send each shared prefix alone before its
    group where the engine does not share it within a batch (the ``warm_prefixes`` rule)."""
    batch_size: int | None = None
    """Prompts handed to the backend at a time (None: 2048 for engines that run a batch's
    requests concurrently, such as vLLM; 64 otherwise)."""
    dry_run: bool = False
    """Answer with fixed valid answers and never load a model (cost estimation)."""
    cache: bool | str | os.PathLike[str] | None = None
    """The persistent result cache: None (on, at ``$LLMSQL_CACHE`` or the user cache folder;
    off for backend objects), a file path, True or False."""
    on_error: OnError = "null"
    """``null`` (a prompt that fails for good gives NULL) or ``fail`` (the query stops);
    given in any case, kept in lower case."""
    budget: Budget = field(default_factory=Budget)
    """Per-query limits (a dict of them is turned into a :class:`~llmsql.budget.Budget`)."""
    prices: Mapping[str, Price] = field(default_factory=lambda: _EMPTY)
    """Model name (``default``: the session's model) -> price; given as ``(input, output)``
    USD per million tokens, or ``{"input": x, "output": y}``, kept as :class:`Price`."""
    backend_options: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    """Backend settings, e.g. ``max_model_len``; for ``openai``: ``base_url``,
    ``api_key_env``, ``concurrency``...; for ``transformers``, expert offload:
    ``expert_cache``, ``moe_plan``, ``predictor``, ``lookahead``, ``moe_profile`` (checked
    here, see :mod:`llmsql.moe.options`) (kept as a read-only copy)."""
    adapters: str | os.PathLike[str] | None = None
    """The folder of the session's LoRA adapters (``CREATE ADAPTER``); None: next to the
    database file (``<file>.adapters``), or the user data folder for ``:memory:`` (see
    :func:`llmsql.adapters.catalog.default_folder`)."""
    slo_tpot_ms: float | None = None
    """While an adapter trains on the session's backend, the queries' time per output token
    objective in milliseconds (``SET llmsql.slo_tpot_ms``); None: none."""

    def __post_init__(self) -> None:
        _check_backend(self.backend)
        _check_type("model", self.model, (str, os.PathLike, type(None)),
                    "a model folder or name, or None")
        _check_type("database", self.database, (str, os.PathLike),
                    "a DuckDB file path or ':memory:'")
        _check_type("engine", self.engine, (str,), "an engine name: 'duckdb' or 'spark'")
        for name in ("optimize", "warm_prefixes", "dry_run"):
            _check_type(name, getattr(self, name), (bool,), "True or False")
        _check_type("progress", self.progress, (bool, type(None)), "True, False or None")
        _check_type("cache", self.cache, (bool, str, os.PathLike, type(None)),
                    "None, True, False or a file path")
        _check_batch_size(self.batch_size)
        _check_type("adapters", self.adapters, (str, os.PathLike, type(None)),
                    "None or the folder of the session's adapters")
        _set(self, "slo_tpot_ms", check_slo_tpot_ms(self.slo_tpot_ms))
        settings = _initial_settings(self.on_error, self.budget)
        _set(self, "on_error", settings.on_error)
        _set(self, "budget", settings.budget)
        _set(self, "prices", _prices(self.prices))
        _set(self, "backend_options", _options(self.backend_options))
        check_moe(self.backend, self.model, self.backend_options)

    @property
    def settings(self) -> Settings:
        """The ``SET llmsql.*`` settings a session opened with this config starts from."""
        return Settings(on_error=self.on_error, budget=self.budget)


def _set(config: SessionConfig, name: str, value: Any) -> None:
    """Store a normalized field value (the dataclass is frozen; only __post_init__ calls)."""
    object.__setattr__(config, name, value)


def _check_type(name: str, value: Any, types: tuple[type, ...], expected: str) -> None:
    # bool is an int: a flag given as 0/1 and a number given as True are both refused
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        msg = (
            f"{name}={value!r}: expected {expected}; fix the {name}= setting "
            "of llmsql.connect() (or SessionConfig)"
        )
        raise ConfigError(msg)


def _check_backend(backend: Any) -> None:
    if isinstance(backend, str):
        if backend not in BACKENDS:
            msg = f"unknown backend {backend!r}; choose one of: {', '.join(sorted(BACKENDS))}"
            raise ConfigError(msg)
    elif backend is not None and not callable(getattr(backend, "generate", None)):
        msg = (
            f"backend={backend!r}: expected a backend name ({', '.join(sorted(BACKENDS))}) or "
            "an object implementing llmsql.backends.LLMBackend (generate, count_tokens, "
            "model_id, close, capabilities)"
        )
        raise ConfigError(msg)


def check_slo_tpot_ms(value: Any, /) -> float | None:
    """The ``slo_tpot_ms`` setting checked: None, or milliseconds per output token > 0.

    >>> check_slo_tpot_ms(50), check_slo_tpot_ms(None)
    (50.0, None)

    Raises:
        ConfigError: anything else.
    """
    if value is None:
        return None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0 < value < float("inf")):
        msg = (f"slo_tpot_ms={value!r}: expected milliseconds per output token > 0 that "
               "queries running beside adapter training should keep, e.g. SET "
               "llmsql.slo_tpot_ms = 50; or NULL for no objective")
        raise ConfigError(msg)
    return float(value)


def adapter_folder(config: SessionConfig, /) -> Path:
    """Where a session with ``config`` keeps its adapters (``adapters=`` or next to its
    database, see :func:`llmsql.adapters.catalog.default_folder`).
    """
    from llmsql.adapters.catalog import default_folder

    if config.adapters is not None:
        return Path(config.adapters).expanduser()
    return default_folder(os.fspath(config.database))


def _check_batch_size(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        msg = (
            f"batch_size={value!r}: expected a whole number of prompts >= 1 handed to the "
            "backend at a time; or None for the engine's default (2048 where a batch runs "
            "concurrently, 64 otherwise)"
        )
        raise ConfigError(msg)


def _initial_settings(on_error: Any, budget: Any) -> Settings:
    """``on_error`` and ``budget`` checked as ``SET llmsql.*`` checks them."""
    settings = apply_setting(Settings(), "on_error", on_error)
    if isinstance(budget, Budget):
        items: dict[str, Any] = dataclasses.asdict(budget)
    elif isinstance(budget, Mapping) or budget is None:
        items = dict(budget or {})
    else:
        msg = (
            f"budget={budget!r}: expected a llmsql.budget.Budget or a dict with max_calls, "
            "max_prompt_tokens, max_output_tokens, max_cost_usd"
        )
        raise ConfigError(msg)
    for name, value in items.items():
        settings = apply_setting(settings, name, value)
    return settings


def _prices(prices: Any) -> Mapping[str, Price]:
    if prices is None:
        return _EMPTY
    if not isinstance(prices, Mapping):
        msg = (
            f"prices={prices!r}: expected a dict of model name -> (input, output) USD per "
            "million tokens, e.g. prices={'default': (0.15, 0.6)}"
        )
        raise ConfigError(msg)
    return MappingProxyType({
        str(k): v if isinstance(v, Price) else Price.parse(str(k), v) for k, v in prices.items()
    })


def _options(options: Any) -> Mapping[str, Any]:
    if options is None:
        return _EMPTY
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        msg = (
            f"backend_options={options!r}: expected a dict of setting name -> "
            "value, e.g. {'max_model_len': 2048}"
        )
        raise ConfigError(msg)
    return MappingProxyType(dict(options))


def check_moe(backend: str | LLMBackend | None, model: str | os.PathLike[str] | None,
              options: Mapping[str, Any], /, *, complete: bool = True) -> None:
    """Check the expert offload options among ``options`` (:mod:`llmsql.moe.options`) for
    ``backend`` (None: not known yet, the values alone) and, when its folder is on disk,
    ``model`` (a dense model, or a cache smaller than one layer's top-k, fails here).

    Raises:
        ConfigError: as :func:`llmsql.backends.moe_glue.moe_backend_options` and
            :func:`~llmsql.backends.moe_glue.check_model`.
    """
    if not moe_glue.given_options(options):
        return
    kind = backend if isinstance(backend, str) or backend is None else getattr(
        backend, "name", "custom")
    moe_glue.moe_backend_options(kind or "transformers", options, complete=complete)
    if options.get("expert_cache") is not None:
        moe_glue.check_model(None if model is None else os.fspath(model), options)


def resolve_cache_path(config: SessionConfig, /) -> Path | None:
    """Where the result cache of a session with ``config`` lives, or None when it is off
    (dry runs never cache; a backend object caches only when given a path or True).
    """
    cache = config.cache
    if config.dry_run or cache is False:
        return None
    if cache is None:
        env = os.environ.get("LLMSQL_CACHE", "")
        custom = config.backend is not None and not isinstance(config.backend, str)
        if custom or env.lower() in ("off", "0", "false", "no"):
            return None
        return Path(env).expanduser() if env else default_cache_path()
    return default_cache_path() if cache is True else Path(cache).expanduser()


def resolve_backend_options(kind: str, options: Mapping[str, Any], /) -> dict[str, Any]:
    """The backend options as the backend spec gets them: for ``openai``, ``OPENAI_BASE_URL``
    is read once here, and an API key given in code is hidden behind a Secret.
    """
    out = dict(options)
    if kind != "openai":
        return out
    from llmsql.backends.openai_compat import Secret

    if "base_url" not in out and os.environ.get("OPENAI_BASE_URL"):
        out["base_url"] = os.environ["OPENAI_BASE_URL"]
    if isinstance(out.get("api_key"), str):
        out["api_key"] = Secret(out["api_key"])
    return out
