"""SessionConfig: one frozen, checked value for a session's settings; connect() builds it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest

import llmsql
from llmsql.budget import Budget, Price
from llmsql.config import SessionConfig, resolve_backend_options, resolve_cache_path
from llmsql.errors import ConfigError
from llmsql.session import Session
from tests.answers import RuleBackend

QUERY = ("SELECT id, LLM('Say', review) AS s FROM reviews WHERE LLM_FILTER('Good?', review) "
         "AND LLM_FILTER('Good?', review, movie) ORDER BY id")


@pytest.mark.parametrize(("settings", "message"), [
    ({"batch_size": 0}, r"batch_size=0: expected a whole number of prompts >= 1"),
    ({"batch_size": -3}, r"batch_size=-3"),
    ({"batch_size": True}, r"batch_size=True"),
    ({"batch_size": "64"}, r"batch_size='64'"),
    ({"optimize": "yes"}, r"optimize='yes': expected True or False; fix the optimize= "),
    ({"dry_run": 1}, r"dry_run=1: expected True or False"),
    ({"warm_prefixes": None}, r"warm_prefixes=None"),
    ({"progress": "auto"}, r"progress='auto': expected True, False or None"),
    ({"backend": "nope"}, r"unknown backend 'nope'; choose one of: openai, transformers, vllm"),
    ({"backend": 42}, r"backend=42: expected a backend name .* or an object implementing"),
    ({"engine": 5}, r"engine=5: expected an engine name"),
    ({"database": None}, r"database=None: expected a DuckDB file path"),
    ({"model": 3}, r"model=3"),
    ({"cache": 3}, r"cache=3: expected None, True, False or a file path"),
    ({"on_error": "ignore"}, r"llmsql.on_error must be 'null' or 'fail', not 'ignore'"),
    ({"budget": {"max_calls": -1}}, r"max_calls"),
    ({"budget": {"max_tokens": 3}}, r"unknown setting llmsql.max_tokens"),
    ({"budget": "lots"}, r"budget='lots': expected a llmsql.budget.Budget or a dict"),
    ({"prices": {"m": "cheap"}}, r"price of model 'm'"),
    ({"prices": [("m", (1, 2))]}, r"prices=.*expected a dict of model name"),
    ({"backend_options": {1: 2}}, r"backend_options=.*expected a dict of setting name"),
])
def test_bad_settings_say_which_and_how_to_fix(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SessionConfig(**settings)
    if "backend_options" in settings:
        return  # connect() takes them as its own keywords
    with pytest.raises(ConfigError, match=message):  # connect() checks before any engine starts
        llmsql.connect(**settings)


def test_the_config_is_frozen_and_owns_its_values() -> None:
    prices = {"default": (1.0, 2.0)}
    options = {"max_model_len": 512}
    cfg = SessionConfig(prices=prices, backend_options=options, budget={"max_calls": 3})
    prices["default"] = (9.0, 9.0)
    options["max_model_len"] = 9
    assert cfg.prices == {"default": Price(1.0, 2.0)}
    assert cfg.backend_options == {"max_model_len": 512}
    assert cfg.budget == Budget(max_calls=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optimize = False  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.prices["x"] = Price(0, 0)  # type: ignore[index]
    with pytest.raises(TypeError):
        cfg.backend_options["x"] = 1  # type: ignore[index]


def test_derived_configs_are_checked_again() -> None:
    cfg = SessionConfig(dry_run=True, on_error="FAIL", prices={"m": {"input": 1, "output": 2}})
    small = dataclasses.replace(cfg, batch_size=8)
    assert (small.batch_size, small.on_error, small.prices) == (8, "fail", cfg.prices)
    assert small.settings == cfg.settings
    with pytest.raises(ConfigError, match="batch_size=0"):
        dataclasses.replace(cfg, batch_size=0)


def run(con: Session, reviews: pd.DataFrame) -> list[tuple]:
    con.register("reviews", reviews)
    return [tuple(r) for r in con.sql(QUERY).df().itertuples(index=False)]


@pytest.mark.parametrize("optimize", [True, False])
def test_connect_and_session_from_a_config_answer_alike(
    reviews: pd.DataFrame, optimize: bool
) -> None:
    rules = [RuleBackend() for _ in range(4)]
    settings = {"progress": False, "optimize": optimize, "batch_size": 2}
    opened = [
        llmsql.connect(backend=rules[0], **settings),
        Session(SessionConfig(backend=rules[1], **settings)),
        Session(backend=rules[2], **settings),  # the keyword form
        Session(SessionConfig(backend=rules[3], optimize=not optimize), **settings),  # override
    ]
    try:
        got = [run(con, reviews) for con in opened]
        configs = [con.config for con in opened]
    finally:
        for con in opened:
            con.close()
    assert got[0] == [(1, "GREAT FUN"), (4, "GREAT FUN")]
    assert got[1] == got[2] == got[3] == got[0]
    assert [r.prompts for r in rules[1:]] == [rules[0].prompts] * 3
    assert configs[1:] == [dataclasses.replace(configs[0], backend=r) for r in rules[1:]]
    assert configs[0].optimize is optimize


def test_a_session_starts_from_its_configs_settings() -> None:
    with llmsql.connect(dry_run=True, on_error="Fail", budget=Budget(max_calls=5),
                        prices={"default": (1, 2)}) as con:
        assert con.settings.on_error == "fail" and con.settings.budget.max_calls == 5
        con.set("max_calls", 7)
        assert con.settings.budget.max_calls == 7
        assert con.config.budget.max_calls == 5  # SET changes the session, not its config


def test_the_environment_is_read_once_when_a_session_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMSQL_CACHE", str(tmp_path / "env.sqlite"))
    assert resolve_cache_path(SessionConfig()) == tmp_path / "env.sqlite"
    assert resolve_cache_path(SessionConfig(cache=tmp_path / "c.sqlite")) == tmp_path / "c.sqlite"
    assert resolve_cache_path(SessionConfig(dry_run=True, cache=True)) is None
    assert resolve_cache_path(SessionConfig(backend=RuleBackend())) is None
    monkeypatch.setenv("LLMSQL_CACHE", "off")
    assert resolve_cache_path(SessionConfig()) is None
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    opts = resolve_backend_options("openai", {"api_key": "sk-secret"})
    assert opts["base_url"] == "http://127.0.0.1:9/v1" and "sk-secret" not in repr(opts)
    assert resolve_backend_options("transformers", {"threads": 1}) == {"threads": 1}
