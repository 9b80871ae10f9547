"""Warm-ups against a real ``llmsql serve`` (the embedded model) on 127.0.0.1 (issue 13).

The optimizer sends a shared prefix alone ahead of its group only where the cost model says
it pays, and never for a query that does not need one: with the optimizer off, for a prefix
shorter than the server's KV block, with one request in flight, or for answers the result
cache already holds. Every case counts what reached the server in its request log. The
server's own statistics say how many prompt tokens it reused, and where a server leaves them
out (as vLLM's does without ``--enable-prompt-tokens-details``) the statistics say "not
reported", never 0%.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import llmsql
from tests.llm_servers import ServeProcess, client_options, read_jsonl, shared_server, start_serve

pytestmark = pytest.mark.model

TOPICS = ("the history of mathematics from Babylon to Euclid and the long road to algebra",
          "the arithmetic of whole numbers, their divisors, primes and remainders in school",
          "exercises for children who learn to count, to add and to take away small numbers")
QUERY = "SELECT n, LLM_FILTER('Is the number even? Answer Yes or No.', topic, n) AS even FROM t"
ROWS = 24


@pytest.fixture(scope="module")
def server() -> ServeProcess:
    return shared_server()


def table() -> pd.DataFrame:
    """Three groups of eight prompts; each group shares a prefix of about 35 tokens."""
    return pd.DataFrame({"n": range(ROWS), "topic": [TOPICS[i % 3] for i in range(ROWS)]})


def run(server: ServeProcess, **options: Any) -> tuple[llmsql.Result, int]:
    """The query through the server: its result and the requests the server answered."""
    before = len(read_jsonl(server.request_log))
    with llmsql.connect(**client_options(server, **{"cache": False, **options})) as con:
        con.register("t", table())
        res = con.sql(QUERY)
        res.df()
    return res, len(read_jsonl(server.request_log)) - before


def test_warm_ups_are_sent_where_they_pay(server: ServeProcess) -> None:
    res, requests = run(server)
    [call] = res.stats.calls
    [note] = [n for n in call.notes if n.startswith("warm_prefixes")]
    planned = int(re.match(r"warm_prefixes: (\d+) shared", note).group(1))  # type: ignore[union-attr]
    assert call.sent == ROWS and call.warmup_prompts == planned >= 1
    assert requests == ROWS + planned
    assert "predicted to save" in note


@pytest.mark.parametrize(("case", "options"), [
    ("optimizer off", {"optimize": False}),
    ("prefix shorter than a block", {"block_size": 256}),
    ("one request at a time", {"concurrency": 1}),
])
def test_no_warm_up_where_it_cannot_pay(server: ServeProcess, case: str,
                                        options: dict[str, Any]) -> None:
    res, requests = run(server, **options)
    [call] = res.stats.calls
    assert call.warmup_prompts == 0, case
    assert requests == ROWS == call.sent, case
    assert res.df()["even"].notna().all()


def test_no_warm_up_for_answers_in_the_result_cache(server: ServeProcess,
                                                    tmp_path: Path) -> None:
    cache = tmp_path / "results.sqlite"
    first, paid = run(server, cache=str(cache))
    assert paid == ROWS + first.stats.calls[0].warmup_prompts > ROWS
    again, requests = run(server, cache=str(cache))
    assert requests == 0 and again.stats.calls[0].warmup_prompts == 0
    assert again.df().equals(first.df())


def test_explain_shows_each_warm_up_decision(server: ServeProcess) -> None:
    with llmsql.connect(**client_options(server, cache=False)) as con:
        con.register("t", table())
        text = con.explain(QUERY).text
        measured = con.explain(QUERY, analyze=True).text
    assert re.search(r"warm-ups: [1-9]\d* sent, [\d,]+ prompt tokens computed for them; the "
                     r"call's prompts then found [\d,]+ cached", measured)
    assert re.search(r"warm_prefixes: [1-9]\d* shared prefix\(es\) warmed in 1 window\(s\), "
                     r"predicted to save [\d,]+ prefill tokens", text)


@pytest.fixture(scope="module")
def quiet_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """A second server that leaves cached tokens out of its answers' usage."""
    proc = start_serve(tmp_path_factory.mktemp("quiet"), "--no-prompt-tokens-details")
    yield proc
    proc.stop()


def test_cached_tokens_are_read_or_said_to_be_unknown(server: ServeProcess,
                                                      quiet_server: ServeProcess) -> None:
    told, _ = run(server)
    call = told.stats.calls[0]
    assert call.cache_unreported == 0 and call.cached_tokens > 0
    assert "% cached" in told.stats.summary()
    silent, _ = run(quiet_server)
    call = silent.stats.calls[0]
    assert call.cache_unreported == call.sent == ROWS and call.cached_tokens == 0
    assert "cached tokens not reported by the backend" in silent.stats.summary()
    assert "% cached" not in silent.stats.summary()
