"""The openai backend through a fault-injecting proxy in front of a real ``llmsql serve``.

Every completion request may get a 429 with Retry-After, a 500 (before or after the server
computed the answer), a dropped connection, a stall past the client's timeout, a truncated
body or malformed JSON. The query must still answer every row, and joining the server's
request log with the client's attempt log must show that no prompt was paid for again once
its answer had reached the client; answers lost in transit are counted separately.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest

import llmsql
from llmsql.errors import BackendError, CallFailed
from tests.llm_servers import (
    FAULTS,
    LOST_AFTER_PAYING,
    FaultPlan,
    FaultProxy,
    client_options,
    join_logs,
    read_jsonl,
    shared_server,
)

pytestmark = pytest.mark.model

RATES = {"429": 0.05, "500_before": 0.03, "500_after": 0.03, "drop_before": 0.02,
         "drop_after": 0.02, "truncate": 0.02, "malformed": 0.02, "garbage": 0.02}
"""After one of each kind: about 21% of completion requests get a fault (one stall only: each
costs a client timeout)."""
CLIENT_TIMEOUT_S = 15.0


def numbers(rows: int, distinct: int) -> pd.DataFrame:
    return pd.DataFrame({"id": range(rows), "n": [i % distinct for i in range(rows)]})


def run_through_faults(tmp_path: Path, rows: int, distinct: int) -> None:
    server = shared_server()
    client_log = tmp_path / "client.jsonl"
    plan = FaultPlan(first=FAULTS, rates=RATES, seed=7)
    with FaultProxy(server.url, plan, stall=CLIENT_TIMEOUT_S + 1, retry_after=1.0) as proxy:
        opts = client_options(server, client_log, base_url=proxy.url, cache=False,
                              timeout=CLIENT_TIMEOUT_S, max_retries=10, backoff=0.1,
                              max_backoff=2.0, concurrency=8)
        t0 = time.monotonic()
        with llmsql.connect(**opts) as con:
            con.register("t", numbers(rows, distinct))
            res = con.sql("SELECT id, n, LLM_FILTER('Is the number even? Answer Yes or No.', n, "
                          "max_tokens => 2) AS even FROM t ORDER BY id")
        seconds = time.monotonic() - t0
    df = res.df()
    joined = join_logs(server.request_log, [client_log])
    faults = proxy.faults()
    print(f"\n{rows} rows, {distinct} distinct prompts in {seconds:.1f} s; faults injected: "
          f"{dict(faults)}; client attempts: {dict(joined.attempts)}; server paid "
          f"{joined.paid} answers for {joined.prompts} prompts: {joined.repaid} paid twice, "
          f"{joined.lost_in_transit} lost in transit, {joined.paid_after_delivery} paid after "
          "delivery")

    # every row answered, no failures, one answer per distinct input
    assert len(df) == rows
    assert df["even"].notna().all(), df[df["even"].isna()]
    assert res.stats.failed == 0 and res.stats.null_answers == 0
    assert (df.groupby("n")["even"].nunique() == 1).all()
    # every fault kind happened, and the client saw them
    assert set(FAULTS) <= set(faults)
    assert joined.attempts["ok"] == distinct
    assert joined.attempts["http 429"] >= 1 and joined.attempts["malformed"] >= 1
    # the join: nothing paid again after delivery; re-payments are exactly the lost replies
    assert joined.prompts == distinct
    assert joined.paid_after_delivery == 0
    assert joined.unmatched_answers == 0
    assert joined.repaid == joined.lost_in_transit
    assert joined.lost_in_transit >= sum(faults[f] for f in LOST_AFTER_PAYING)
    _check_retry_after(client_log, proxy)


def _check_retry_after(client_log: Path, proxy: FaultProxy) -> None:
    """A request that got a 429 with Retry-After: 1 waited at least that long."""
    attempts = {(e["request"], e["attempt"]): e for e in read_jsonl(client_log)}
    waited = [attempts[(r, a + 1)]["started"] - e["t"] for (r, a), e in attempts.items()
              if e["outcome"] == "http 429" and (r, a + 1) in attempts]
    assert waited and min(waited) >= proxy.retry_after - 0.05


def test_query_completes_through_faults(tmp_path: Path) -> None:
    """2,000 rows over 40 distinct prompts (the full 2,000-prompt run is marked slow)."""
    run_through_faults(tmp_path, rows=2000, distinct=40)


@pytest.mark.slow
def test_query_completes_through_faults_2000_prompts(tmp_path: Path) -> None:
    run_through_faults(tmp_path, rows=2000, distinct=2000)


def test_requests_that_fail_for_good_follow_the_error_policy(tmp_path: Path) -> None:
    server = shared_server()
    plan = FaultPlan(first=(), rates={"500_before": 1.0})
    with FaultProxy(server.url, plan) as proxy:
        opts = client_options(server, base_url=proxy.url, cache=False, max_retries=1,
                              backoff=0.01)
        with llmsql.connect(**opts) as con:
            con.register("t", numbers(3, 3))
            res = con.sql("SELECT n, LLM_FILTER('Even?', n) AS e FROM t ORDER BY n")
            assert res.df()["e"].isna().all()
            assert res.stats.failed == 3
            errors = con.last_errors()
            assert len(errors) == 3 and all(e.kind == "failed" for e in errors)
            assert "gave up after 2 attempts" in errors[0].reason
            assert "HTTP 500" in errors[0].reason
            con.sql("SET llmsql.on_error = 'fail'")
            with pytest.raises(CallFailed, match="on_error"):
                con.sql("SELECT n, LLM_FILTER('Even?', n) AS e FROM t")


def test_a_dead_server_stops_the_query_instead_of_nulling_every_row(tmp_path: Path) -> None:
    server = shared_server()
    plan = FaultPlan(first=(), rates={"drop_before": 1.0})
    with FaultProxy(server.url, plan) as proxy:
        opts = client_options(server, base_url=proxy.url, cache=False, max_retries=0,
                              backoff=0.01, concurrency=2)
        with llmsql.connect(**opts) as con:
            con.register("t", numbers(40, 40))
            with pytest.raises(BackendError, match="in a row"):
                con.sql("SELECT n, LLM_FILTER('Even?', n) AS e FROM t")
