"""The llmsql command, run as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, SAMPLE


def cli(*args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmsql.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout)


def test_explain_prints_plan_and_writes_prompts(tmp_path: Path) -> None:
    out = tmp_path / "prompts.jsonl"
    p = cli("explain", "-e", "SELECT id FROM s WHERE LLM_FILTER('About a team?', title, question)",
            "--table", f"s={SAMPLE}", "--prompts", str(out))
    assert p.returncode == 0, p.stderr
    assert "LLM_FILTER in WHERE" in p.stdout
    prompts = [json.loads(line)["prompt"] for line in out.read_text().splitlines()]
    import duckdb

    distinct = duckdb.sql(f"SELECT COUNT(DISTINCT (title, question)) FROM '{SAMPLE}'").fetchall()
    assert len(prompts) == len(set(prompts)) == distinct[0][0]  # one prompt per distinct input
    assert all(x.startswith("About a team?\n") for x in prompts)
    assert f"wrote {len(prompts)} prompts" in p.stderr


def test_explain_of_quickstart_needs_no_model() -> None:
    p = cli("explain", "examples/quickstart.sql")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("LLMCall") == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "-e", "SELEC 1"], "syntax error"),
        (["run", "-e", "SELECT LLM('x', nope) FROM s"], "nope"),
        (["run", "-e", "SELECT 1", "--table", "s"], "NAME=PATH"),
        (["run", "-e", "SELECT 1", "--table", "s=/no/such.parquet"], "does not exist"),
        (["run", "missing.sql"], "does not exist"),
        (["run", "-e", "SELECT 1", "--backend", "nope"], "unknown backend"),
        (["run", "-e", "SELECT 1", "--output", "x.xlsx"], ".parquet"),
        (["run", "-e", "SELECT LLM('x', a, model => '/no/model') FROM (SELECT 1 AS a)"],
         "/no/model"),
    ],
)
def test_user_errors_exit_1_without_traceback(args: list[str], message: str) -> None:
    p = cli(*args, "--table", f"s={SAMPLE}") if "--table" not in args else cli(*args)
    assert p.returncode == 1, p.stdout + p.stderr
    assert message in p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr.startswith("llmsql: error:")


def test_debug_shows_the_traceback() -> None:
    p = cli("--debug", "run", "-e", "SELEC 1")
    assert p.returncode != 0
    assert "Traceback" in p.stderr


def test_failed_query_writes_no_output(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    p = cli("run", "-e", "SELECT LLM('x', nope) FROM s", "--table", f"s={SAMPLE}",
            "--output", str(out))
    assert p.returncode == 1
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_plain_sql_runs_and_writes_each_format(tmp_path: Path) -> None:
    for name in ("o.parquet", "o.csv", "o.json"):
        p = cli("run", "-e", "SELECT title, COUNT(*) AS n FROM s GROUP BY 1 ORDER BY 1",
                "--table", f"s={SAMPLE}", "--output", str(tmp_path / name))
        assert p.returncode == 0, p.stderr
        assert (tmp_path / name).stat().st_size > 0
    p = cli("run", "-e", "SELECT COUNT(*) AS n FROM s", "--table", f"s={SAMPLE}", "-o", "-")
    assert p.stdout.splitlines() == ['"n"', "300"]


def test_json_output_is_typed_as_duckdb_types_it(tmp_path: Path) -> None:
    """Issue 11: a HUGEINT sum, a decimal, an integer with NULLs and a timestamp come out of
    .json/.jsonl as numbers, an ISO string and null, whatever the pandas version (pandas 3's
    to_json wrote the sum as a string, pandas 2 as a float, and timestamps as epochs)."""
    sql = ("SELECT SUM(i) AS total, CAST(1.25 AS DECIMAL(4, 2)) AS dec, "
           "NULLIF(MAX(i), 3) AS top, TIMESTAMP '2020-01-02 03:04:05' AS at "
           "FROM range(4) AS r(i)")
    want = {"total": 6, "dec": 1.25, "top": None, "at": "2020-01-02 03:04:05"}
    for name in ("o.json", "o.jsonl"):
        p = cli("run", "-e", sql, "--output", str(tmp_path / name))
        assert p.returncode == 0, p.stderr
        text = (tmp_path / name).read_text()
        got = json.loads(text)[0] if name == "o.json" else json.loads(text.splitlines()[0])
        assert got == want and isinstance(got["total"], int)


@pytest.mark.spark
@pytest.mark.model
def test_spark_run_shows_llmsql_progress_not_sparks(tmp_path: Path) -> None:
    """``llmsql run --engine spark --progress`` on a 12-row table, answered by the real model
    on the executors: llmsql's progress line, and no Spark console progress bar (lines such
    as ``[Stage 3:>   (0 + 2) / 200]``) on stdout or stderr."""
    pytest.importorskip("pyspark", reason="pyspark is not installed (pip install '.[spark]')")
    import pandas as pd

    table = tmp_path / "twelve.csv"
    pd.DataFrame({"id": list(range(12)), "movie": ["Up", "Heat", "Alien"] * 4}).to_csv(
        table, index=False)
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable,
           "PYSPARK_DRIVER_PYTHON": sys.executable}
    p = subprocess.run(
        [sys.executable, "-m", "llmsql.cli", "run", "--engine", "spark", "--master", "local[2]",
         "--progress", "--no-cache", "--option", "threads=1", "--table", f"twelve={table}",
         "-e", "SELECT id, LLM('Name the movie.', movie, max_tokens => 2) AS s FROM twelve"],
        check=False, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "12 rows" in p.stdout
    assert re.search(r"LLM\(\.\.\.\) at line 1, column \d+: 3/3 prompts", p.stderr), p.stderr
    assert "[Stage" not in p.stdout + p.stderr, p.stderr


@pytest.mark.parametrize("where", ["missing-folder/out.csv", "afile.parquet/x.csv"])
def test_bad_output_folder_fails_before_running(tmp_path: Path, where: str) -> None:
    """Issue 12: a bad --output folder is a clear error up front, not a traceback after the
    query ran (and its LLM calls were paid)."""
    (tmp_path / "afile.parquet").write_text("not a folder")
    p = cli("run", "-e", "SELECT 1 AS x", "--output", str(tmp_path / where))
    assert p.returncode == 1, p.stderr
    assert p.stderr.startswith("llmsql: error: --output"), p.stderr
    assert "Traceback" not in p.stderr
    assert "folder" in p.stderr

def test_preview_honours_max_rows() -> None:
    p = cli("run", "-e", "SELECT * FROM range(100)", "--max-rows", "40")
    assert p.returncode == 0, p.stderr
    assert "(20 shown)" not in p.stdout
    assert re.search(r"│\s+39 │", p.stdout), p.stdout
    assert "(60 more rows)" in p.stdout


def test_null_note_points_to_stats_only_without_it() -> None:
    from llmsql.cli import _null_note

    assert "--stats" in _null_note(2, stats=False)
    assert "--stats" not in _null_note(2, stats=True)
    assert _null_note(0, stats=False) == ""

def test_cli_silences_only_the_past_key_values_warning() -> None:
    import warnings

    from llmsql.cli import _quiet_known_warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _quiet_known_warnings()
        warnings.warn("Passing a tuple of `past_key_values` is deprecated", FutureWarning,
                      stacklevel=1)
        warnings.warn("something else", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["something else"]

def test_empty_csv_output_says_types_are_lost(tmp_path: Path) -> None:
    p = cli("run", "-e", "SELECT 1 AS n WHERE false", "--output", str(tmp_path / "e.csv"))
    assert p.returncode == 0, p.stderr
    assert "parquet" in p.stderr and "empty" in p.stderr
    p = cli("run", "-e", "SELECT 1 AS n WHERE false", "--output", str(tmp_path / "e.parquet"))
    assert "empty" not in p.stderr


def test_explain_of_file_has_no_comments_in_plan_lines(tmp_path: Path) -> None:
    query = tmp_path / "q.sql"
    query.write_text("-- my header comment\n-- second line\n"
                     f"SELECT id FROM '{SAMPLE}' WHERE LLM_FILTER('About a team?', title)\n")
    p = cli("explain", str(query))
    assert p.returncode == 0, p.stderr
    assert "header comment" not in p.stdout, p.stdout
    assert "/*" not in p.stdout


def test_dry_run_is_labelled() -> None:
    p = cli("run", "--dry-run", "-e", "SELECT LLM('Say hi.', a) AS s FROM (SELECT 'x' AS a)")
    assert p.returncode == 0, p.stderr
    assert "dry run: made-up answers, not a result" in p.stderr
    assert "dry run: made-up answers, not a result" in p.stdout


def test_preview_shows_every_statement() -> None:
    p = cli("run", "-e", "SELECT 101 AS first_one; SELECT 202 AS second_one")
    assert p.returncode == 0, p.stderr
    assert "first_one" in p.stdout and "101" in p.stdout
    assert "second_one" in p.stdout and "202" in p.stdout


def test_output_refuses_several_row_statements_but_allows_set_first(tmp_path: Path) -> None:
    out = tmp_path / "o.csv"
    p = cli("run", "-e", "SELECT 1 AS a; SELECT 2 AS b", "--output", str(out))
    assert p.returncode == 1
    assert "statements 1 and 2" in p.stderr and "Traceback" not in p.stderr
    assert not out.exists()
    p = cli("run", "-e", "SET llmsql.max_calls = 5; SELECT 2 AS b", "--output", str(out))
    assert p.returncode == 0, p.stderr
    assert out.read_text().splitlines() == ['"b"', "2"]


@pytest.mark.model
def test_explain_sample_costs_later_calls_at_the_sampled_pass_rate() -> None:
    query = ("SELECT id, LLM('Answer in one word.', question) AS a FROM s "
             "WHERE LLM_FILTER('Is the question about a sports team?', title, question)")
    bound = cli("explain", "-e", query, "--table", f"s={SAMPLE}")
    assert bound.returncode == 0, bound.stderr
    assert "as if every row passed it: an upper bound" in bound.stdout
    p = cli("explain", "-e", query, "--table", f"s={SAMPLE}", "--sample", "4", "--no-cache")
    assert p.returncode == 0, p.stderr
    m = re.search(r"sample of LLM_FILTER\(\.\.\.\) at line 1, column \d+: 4 of (\d+) distinct "
                  r"prompts answered by the model, (\d) passed", p.stdout)
    assert m, p.stdout
    assert "an upper bound" not in p.stdout
    rows = [int(n) for n in re.findall(r"LLM\(\.\.\.\) at line 1, column \d+: rows in (\d+)",
                                       p.stdout)]
    assert len(rows) == 1 and rows[0] <= int(m.group(1))  # the later call sees what passed


def test_explain_sample_must_be_a_count() -> None:
    p = cli("explain", "-e", "SELECT 1", "--sample", "-2")
    assert p.returncode == 2 and "whole number of prompts" in p.stderr
