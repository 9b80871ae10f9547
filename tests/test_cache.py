"""The persistent result cache: what it stores, who may read it, concurrent writers, and a
re-run that answers from it without loading the model."""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import llmsql
from llmsql.backends.base import BackendSpec, Capabilities, Request, Response
from llmsql.cache import (
    LazyBackend,
    ResultCache,
    default_cache_path,
    model_key,
    request_key,
)
from llmsql.errors import ConfigError
from tests.answers import RuleBackend
from tests.conftest import ROOT


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---- the store --------------------------------------------------------------------------------


def test_file_is_private_and_in_xdg_cache_home(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = default_cache_path()
    assert path == tmp_path / "xdg" / "llmsql" / "results.sqlite"
    old = os.umask(0o000)  # even a permissive umask must not widen the file
    try:
        cache = ResultCache(path)
        cache.put_many([(b"k" * 32, "m", Response("a"))])
    finally:
        os.umask(old)
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    wal = path.with_name(path.name + "-wal")
    assert wal.exists() and mode(wal) == 0o600  # SQLite copies the database's mode
    cache.close()


def test_existing_file_with_wide_permissions_is_narrowed(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    path.touch()
    path.chmod(0o644)
    ResultCache(path).put_many([(b"k" * 32, "m", Response("a"))])
    assert mode(path) == 0o600


def test_failures_are_never_stored(tmp_path: Path) -> None:
    cache = ResultCache(tmp_path / "c.sqlite")
    ok, bad = request_key("m", Request("a")), request_key("m", Request("b"))
    assert cache.put_many([(ok, "m", Response("yes")), (bad, "m", Response("", error="x"))]) == 1
    assert set(cache.get_many([ok, bad])) == {ok}


def test_keys_cover_every_option_that_changes_an_answer() -> None:
    base = Request("p", max_tokens=4)
    variants = [Request("p", max_tokens=5), Request("q", max_tokens=4),
                Request("p", max_tokens=4, choices=("Yes", "No")),
                Request("p", max_tokens=4, json_schema="{}"),
                Request("p", max_tokens=4, temperature=0.5, seed=1)]
    keys = {request_key("m", r) for r in [base, *variants]}
    assert len(keys) == 6
    assert request_key("m", base) != request_key("other model", base)
    # a seed does not matter at temperature 0
    assert request_key("m", base) == request_key("m", Request("p", max_tokens=4, seed=3))


def test_model_key_needs_no_model_and_ignores_operational_options() -> None:
    a = model_key(BackendSpec.make("transformers", None, threads=1, batch_size=4))
    b = model_key(BackendSpec.make("transformers", None))
    c = model_key(BackendSpec.make("transformers", None, dtype="bfloat16"))
    assert a == b != c
    assert a is not None and "embedded" in a
    url = model_key(BackendSpec.make("openai", "m", base_url="http://u:pw@h:1/v1/",
                                     api_key="sk-secret", timeout=3))
    assert url == "openai:http://h:1/v1:m"
    assert model_key(BackendSpec.make("openai", None, base_url="http://h/v1")) is None


def test_a_corrupt_file_is_a_clear_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError, match="delete the file"):
        ResultCache(path).get_many([b"x"])


def _writer(path: str, worker: int, n: int) -> None:
    cache = ResultCache(path)
    for lo in range(0, n, 25):
        items = []
        for i in range(lo, lo + 25):
            key = request_key("m", Request(f"prompt {i}"))  # workers overlap on purpose
            items.append((key, "m", Response(f"answer {i}", prompt_tokens=i)))
        cache.put_many(items)
        cache.capabilities("m")  # readers interleave with writers
    cache.close()


def test_concurrent_writers_from_several_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.sqlite")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 400 + 100 * w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    cache = ResultCache(path)
    assert len(cache) == 700  # the union of 400, 500, 600 and 700 overlapping prompts
    keys = [request_key("m", Request(f"prompt {i}")) for i in range(700)]
    got = cache.get_many(keys)
    assert [got[k].text for k in keys] == [f"answer {i}" for i in range(700)]
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()


# ---- in a session -----------------------------------------------------------------------------


@pytest.fixture
def table() -> pd.DataFrame:
    return pd.DataFrame({"id": range(6), "review": ["Great", "bad", "Great", "ok", "meh", "x"]})


def test_second_run_is_answered_from_the_cache(tmp_path: Path, table: pd.DataFrame) -> None:
    sql = "SELECT id, LLM('Say', review) AS s FROM t ORDER BY id"
    results = []
    for _ in range(2):
        rule = RuleBackend()
        with llmsql.connect(backend=rule, cache=tmp_path / "c.sqlite", progress=False) as con:
            con.register("t", table)
            res = con.sql(sql)
        results.append((res.df(), len(rule.prompts), res.stats.calls[0]))
    assert results[0][0].equals(results[1][0])
    assert results[0][1] == 5 and results[1][1] == 0
    assert results[1][2].from_cache == 5 and results[1][2].sent == 0


def test_only_reproducible_answers_are_cached(tmp_path: Path, table: pd.DataFrame) -> None:
    path = tmp_path / "c.sqlite"
    with llmsql.connect(backend=RuleBackend(), cache=path, progress=False) as con:
        con.register("t", table)
        con.sql("SELECT LLM('Say', review, temperature => 0.8) AS s FROM t")
        assert len(ResultCache(path)) == 0
        con.sql("SELECT LLM('Say', review, temperature => 0.8, seed => 1) AS s FROM t")
        assert len(ResultCache(path)) == 5


def test_cache_can_be_turned_off(tmp_path: Path, table: pd.DataFrame,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.sqlite"
    with llmsql.connect(backend=RuleBackend(), cache=path, progress=False) as con:
        con.register("t", table)
        con.sql("SET llmsql.cache = false; SELECT LLM('Say', review) AS s FROM t")
    assert not path.exists()
    monkeypatch.setenv("LLMSQL_CACHE", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with llmsql.connect(backend="transformers", dry_run=False, progress=False) as con:
        assert con._result_cache() is None
    # a backend object is not cached unless asked: its identity is the caller's word
    monkeypatch.delenv("LLMSQL_CACHE")
    with llmsql.connect(backend=RuleBackend(), progress=False) as con:
        assert con._result_cache() is None


def test_lazy_backend_uses_recorded_capabilities(tmp_path: Path) -> None:
    cache = ResultCache(tmp_path / "c.sqlite")
    spec = BackendSpec.make("transformers", None)
    built: list[int] = []

    def build() -> RuleBackend:
        built.append(1)
        return RuleBackend(max_model_len=777)

    lazy = LazyBackend(spec, build, cache)
    assert lazy.capabilities.max_model_len == 777 and built == [1]
    again = LazyBackend(spec, build, cache)
    assert again.capabilities == Capabilities(prefix_caching=False, constrained_choice=True,
                                              json_schema=True, max_model_len=777)
    assert built == [1] and not again.built


RERUN = """
import json, sys, llmsql, pandas as pd
con = llmsql.connect(backend="transformers", cache=sys.argv[1], progress=False)
con.register("t", pd.DataFrame({"w": ["sun", "rain", "snow", "sun"]}))
res = con.sql("SELECT w, LLM_FILTER('Is this weather cold?', w) AS cold FROM t ORDER BY w")
print(json.dumps({"rows": res.df().astype(str).values.tolist(),
                  "sent": res.stats.calls[0].sent, "cached": res.stats.calls[0].from_cache,
                  "torch": "torch" in sys.modules}))
con.close()
"""


@pytest.mark.model
def test_rerun_of_a_finished_query_loads_no_model(tmp_path: Path) -> None:
    def run() -> dict[str, object]:
        p = subprocess.run([sys.executable, "-c", RERUN, str(tmp_path / "c.sqlite")],
                           capture_output=True, text=True, cwd=ROOT, timeout=600,
                           check=False)
        assert p.returncode == 0, p.stderr[-2000:]
        return json.loads(p.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert first["sent"] == 3 and first["torch"]
    assert second["sent"] == 0 and second["cached"] == 3
    assert second["torch"] is False  # the model was never loaded
    assert second["rows"] == first["rows"]
