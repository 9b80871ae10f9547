"""Kill-and-resume: ``llmsql run`` is SIGKILLed mid-query and run again.

The client is the real CLI (openai backend) and the model is a real ``llmsql serve``; the
result cache commits each batch, so the second run pays again for at most the batch that
was in flight. Joining the server's request log with both runs' client logs counts it.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ROOT
from tests.llm_servers import SERVER_KEY_ENV, ServeProcess, read_jsonl, shared_server

pytestmark = pytest.mark.model

ROWS = 30
BATCH = 5
KILL_AFTER = 2 * BATCH
SQL = "SELECT n, LLM_FILTER('Is the number even? Answer Yes or No.', n) AS even FROM t ORDER BY n"


def command(server: ServeProcess, folder: Path, cache: str, name: str) -> list[str]:
    return [sys.executable, "-m", "llmsql.cli", "run", "-e", SQL,
            "--table", f"t={folder / 't.parquet'}", "--backend", "openai",
            "--base-url", server.url, "--model", "smollm2", "--api-key-env", SERVER_KEY_ENV,
            "--cache", str(folder / cache), "--batch-size", str(BATCH),
            "--option", f"concurrency={BATCH}",
            "--option", f"request_log={folder / (name + '.jsonl')}",
            "--output", str(folder / (name + ".parquet"))]


def run(cmd: list[str], server: ServeProcess) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, SERVER_KEY_ENV: server.key}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900,
                          check=False)


def cached_answers(path: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return int(con.execute("SELECT COUNT(*) FROM answers").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def kill_midway(cmd: list[str], server: ServeProcess, cache: Path) -> int:
    """Start ``cmd``, SIGKILL it once ``KILL_AFTER`` answers are committed; return that count."""
    env = {**os.environ, SERVER_KEY_ENV: server.key}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and cached_answers(cache) < KILL_AFTER:
            assert proc.poll() is None, "the query finished before it could be killed"
            time.sleep(0.1)
        assert proc.poll() is None, "the query finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return cached_answers(cache)


def test_sigkill_then_rerun_pays_at_most_the_batch_in_flight(tmp_path: Path) -> None:
    server = shared_server()
    pd.DataFrame({"n": range(ROWS)}).to_parquet(tmp_path / "t.parquet")

    reference = run(command(server, tmp_path, "ref.sqlite", "ref"), server)
    assert reference.returncode == 0, reference.stderr[-2000:]

    kept = kill_midway(command(server, tmp_path, "run.sqlite", "first"), server,
                       tmp_path / "run.sqlite")
    assert not (tmp_path / "first.parquet").exists()  # no output from a killed run
    assert KILL_AFTER <= kept < ROWS and kept % BATCH == 0  # whole batches were committed

    second = run(command(server, tmp_path, "run.sqlite", "second"), server)
    assert second.returncode == 0, second.stderr[-2000:]
    expected = pd.read_parquet(tmp_path / "ref.parquet")
    resumed = pd.read_parquet(tmp_path / "second.parquet")
    assert resumed.equals(expected)
    assert resumed["even"].notna().all()

    first_log = read_jsonl(tmp_path / "first.jsonl")
    second_log = read_jsonl(tmp_path / "second.jsonl")
    ids = {e["attempt_id"]: run_no for run_no, log in ((1, first_log), (2, second_log))
           for e in log}
    served = [e for e in read_jsonl(server.request_log) if e["request_id"] in ids]
    paid_first = {e["prompt_sha256"] for e in served if ids[e["request_id"]] == 1}
    paid_second = {e["prompt_sha256"] for e in served if ids[e["request_id"]] == 2}
    repaid = paid_first & paid_second
    print(f"\nkilled with {kept} of {ROWS} answers committed; the first run had paid for "
          f"{len(paid_first)}, the re-run paid for {len(paid_second)}; paid twice: "
          f"{len(repaid)} (batch size {BATCH})")
    assert paid_first | paid_second == {e["prompt_sha256"] for e in served}
    assert len(paid_second) == ROWS - kept
    assert len(repaid) <= BATCH  # only the batch that was in flight at the kill

    third = run(command(server, tmp_path, "run.sqlite", "third"), server)
    assert third.returncode == 0, third.stderr[-2000:]
    assert pd.read_parquet(tmp_path / "third.parquet").equals(expected)
    assert not (tmp_path / "third.jsonl").exists()  # the backend was never even built
