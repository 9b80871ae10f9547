"""The ``%%llmsql`` magic on a real IPython shell, the notebook progress bar, EXPLAIN HTML.

Magic results are compared with ``Session.sql`` on the same data, answered by the
deterministic rule function (tests/answers.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pyarrow as pa
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

import llmsql
from llmsql.explain_html import ExplainReport, explain_report, svg_bar_chart
from llmsql.progress import NoProgress, auto_progress
from llmsql.progress_notebook import BarState, NotebookProgress, in_notebook
from tests.answers import RuleBackend

QUERY = "SELECT id, LLM('Say', movie, review) AS s FROM reviews WHERE stars >= 3 ORDER BY id"


@pytest.fixture(scope="module")
def shell():  # type: ignore[no-untyped-def]
    """A real IPython shell (history in memory) with the extension loaded."""
    cfg = Config()
    cfg.HistoryManager.hist_file = ":memory:"
    sh = InteractiveShell.instance(config=cfg)
    sh.run_line_magic("load_ext", "llmsql")
    yield sh
    sh.run_line_magic("unload_ext", "llmsql")
    InteractiveShell.clear_instance()


@pytest.fixture
def con(rule: RuleBackend, reviews: pd.DataFrame, shell: InteractiveShell):  # type: ignore[no-untyped-def]
    s = llmsql.connect(backend=rule, progress=False)
    s.register("reviews", reviews)
    shell.user_ns["con"] = s
    yield s
    shell.user_ns.pop("con", None)
    s.close()


def cell(shell: InteractiveShell, line: str, sql: str) -> object:
    return shell.run_cell_magic("llmsql", line, sql)


def test_magic_matches_sql(shell: InteractiveShell, con: llmsql.Session) -> None:
    got = cell(shell, "-s con -o out", QUERY)
    want = con.sql(QUERY).df()
    assert isinstance(got, pd.DataFrame)
    assert got.equals(want)
    assert shell.user_ns["out"].equals(want)


def test_magic_returns_arrow(shell: InteractiveShell, con: llmsql.Session) -> None:
    got = cell(shell, "-s con --arrow", QUERY)
    assert isinstance(got, pa.Table)
    assert got.equals(con.sql(QUERY).arrow())


def test_magic_sees_notebook_frames(shell: InteractiveShell, con: llmsql.Session,
                                    reviews: pd.DataFrame) -> None:
    shell.user_ns["nb_reviews"] = reviews.head(3)
    got = cell(shell, "-s con", "SELECT id FROM nb_reviews WHERE LLM_FILTER('Good?', review)")
    assert got["id"].tolist() == [1]
    tables = con.duckdb.sql("SELECT table_name FROM information_schema.tables").fetchall()
    assert ("nb_reviews",) not in tables  # visible to that cell only


def test_session_tables_win_over_notebook_variables(shell: InteractiveShell,
                                                    con: llmsql.Session) -> None:
    shell.user_ns["reviews"] = pd.DataFrame({"id": [99], "review": ["Great"]})
    try:
        got = cell(shell, "-s con", "SELECT COUNT(*) AS n FROM reviews")
    finally:
        del shell.user_ns["reviews"]
    assert got["n"][0] == 6


def test_line_magic_and_stats(shell: InteractiveShell, con: llmsql.Session,
                              capsys: pytest.CaptureFixture[str]) -> None:
    llmsql.set_default_session(con)
    try:
        got = shell.run_line_magic("llmsql", "SELECT COUNT(*) AS n FROM reviews")
        cell(shell, "--stats", QUERY)
    finally:
        llmsql.set_default_session(None)
    assert got["n"][0] == 6
    assert "distinct prompts" in capsys.readouterr().out


def test_explain_is_html_and_runs_no_model(shell: InteractiveShell, con: llmsql.Session,
                                           rule: RuleBackend) -> None:
    rep = cell(shell, "-s con --explain", QUERY)
    assert isinstance(rep, ExplainReport)
    assert rule.calls == 0
    page = rep._repr_html_()
    assert "<table" in page and "<svg" in page and "QueryPlan" in page
    assert "expected cache hits" in page
    assert [c.distinct_prompts for c in rep.calls] == [4]
    assert rep.calls[0].expected_hit is not None and rep.calls[0].measured_hit is None


def test_analyze_measures_and_stores_the_result(shell: InteractiveShell, con: llmsql.Session,
                                                rule: RuleBackend) -> None:
    rep = cell(shell, "-s con --analyze -o analyzed", QUERY)
    assert isinstance(rep, ExplainReport) and rep.analyze
    assert rule.calls > 0
    assert shell.user_ns["analyzed"].equals(con.sql(QUERY).df())
    c = rep.calls[0]
    assert c.measured_hit == 0.0 and c.sent == 4
    assert rep.total_seconds is not None and "where the time went" in rep.html()


def test_dry_run_session_is_kept_and_closed_on_unload(shell: InteractiveShell,
                                                      reviews: pd.DataFrame) -> None:
    shell.user_ns["rv"] = reviews
    first = cell(shell, "--dry-run", "SELECT id, LLM_FILTER('Good?', review) AS f FROM rv")
    assert first["f"].tolist() == [True] * 6  # dry run: fixed valid answers
    magics = shell.magics_manager.registry["LLMSQLMagics"]
    assert len(magics.sessions) == 1
    cell(shell, "--dry-run", "SELECT 1 AS one")
    assert len(magics.sessions) == 1
    magics.close()
    assert magics.sessions == {}


@pytest.mark.parametrize(("line", "sql", "message"), [
    ("-s con", "SELECT LLM('Say', reviw) FROM reviews", "PlanError.*reviw"),
    ("-s nope", "SELECT 1", "not a Session variable"),
    ("-s con -b transformers", "SELECT 1", "cannot be combined"),
    ("-s con", "   ", "no SQL"),
    ("-s con --explain --analyze", "SELECT 1", "either --explain or --analyze"),
    ("-b nonsense", "SELECT 1", "unknown backend"),
])
def test_errors_are_short_usage_errors(shell: InteractiveShell, con: llmsql.Session, line: str,
                                       sql: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        cell(shell, line, sql)


# ---- the progress bar ----------------------------------------------------------------------


class Handle:
    """What IPython's display(..., display_id=True) returns: a handle with update()."""

    def __init__(self, shown: list[BarState]) -> None:
        self.shown = shown

    def update(self, obj: BarState) -> None:
        self.shown.append(obj)


def test_notebook_progress_reports_rate_cache_and_eta() -> None:
    shown: list[BarState] = []
    bar = NotebookProgress(min_interval=0.0,
                           display=lambda obj, display_id: (shown.append(obj), Handle(shown))[1])
    bar.start(4, "LLM_FILTER(...) at line 1")
    bar.advance(2, 100, 40)
    bar.advance(2, 100, 60)
    bar.close()
    assert [s.done for s in shown] == [0, 2, 4, 4]
    last = shown[-1]
    assert last.finished and "4/4 prompts" in repr(last) and "cache 50%" in repr(last)
    assert "done in" in repr(last) and "ETA" in repr(shown[1])
    assert "<progress" in last._repr_html_() and "tok/s" in last._repr_html_()


def test_progress_of_training_steps_counts_steps_and_shows_no_cache() -> None:
    """CREATE ADAPTER's bar counts optimizer steps: no "prompts", no cache figure."""
    import io

    from llmsql.progress import TerminalProgress

    shown: list[BarState] = []
    bar = NotebookProgress(min_interval=0.0,
                           display=lambda obj, display_id: (shown.append(obj), Handle(shown))[1])
    bar.start(10, "CREATE ADAPTER fresh", unit="steps")
    bar.advance(3, 500, None)
    bar.close()
    assert "3/10 steps" in repr(shown[-1]) and "cache" not in repr(shown[-1])
    out = io.StringIO()
    term = TerminalProgress(out, min_interval=0.0)
    term.start(10, "CREATE ADAPTER fresh", unit="steps")
    term.advance(10, 500, None)
    term.close()
    assert "10/10 steps" in out.getvalue() and "cache" not in out.getvalue()
    term.start(2, "LLM(...)")  # a query's bar after it still counts prompts and the cache
    term.advance(2, 100, 50)
    assert "2/2 prompts" in out.getvalue() and "cache 50%" in out.getvalue()


def test_auto_progress_outside_jupyter() -> None:
    assert not in_notebook()
    assert isinstance(auto_progress(False), NoProgress)


def test_svg_chart_escapes_labels() -> None:
    svg = svg_bar_chart([("<b>", [("generation", 1.0), ("inputs", 0.5)])], "a & b")
    assert "&lt;b&gt;" in svg and "a &amp; b" in svg and svg.count("<rect") == 4


def test_explain_report_without_llm_calls(con: llmsql.Session) -> None:
    rep = explain_report(con, "SELECT COUNT(*) FROM reviews")
    assert rep.calls == () and "plain SQL" in rep.html()


def test_notebook_extra_gives_tqdm_its_widget_bar() -> None:
    """In a Jupyter kernel, model downloads/loading draw tqdm.auto bars: with ipywidgets (the
    notebook extra) they are widgets, not a console fallback with 'IProgress not found'."""
    script = (
        "import warnings\n"
        "import ipykernel.zmqshell  # what a Jupyter kernel has imported: tqdm.auto's cue\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from tqdm.auto import tqdm\n"
        "    bar = tqdm(total=2)\n"
        "    bar.update(2)\n"
        "    bar.close()\n"
        "import tqdm.notebook\n"
        "print(isinstance(bar, tqdm.notebook.tqdm))\n"
        "print([str(w.message) for w in caught if 'IProgress' in str(w.message)])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=True)
    widget_bar, problems = done.stdout.splitlines()[-2:]
    assert problems == "[]", done.stdout
    assert widget_bar == "True"


EXIT_SCRIPTS = {
    "magic": (  # the line magic on the default session, never closed
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "sh = InteractiveShell.instance()\n"
        "sh.run_line_magic('load_ext', 'llmsql')\n"
        "print(sh.run_line_magic('llmsql', 'SELECT 1 AS one')['one'][0])\n"
        "print(sh.run_cell_magic('llmsql', '--dry-run', \"SELECT LLM_FILTER('Ok?', 'x') AS f\")"
        "['f'][0])\n"
    ),
    "sql": "import llmsql\nprint(llmsql.sql('SELECT 1 AS one').df()['one'][0])\n",
}


@pytest.mark.parametrize("name", sorted(EXIT_SCRIPTS))
def test_sessions_left_open_are_closed_at_exit(name: str) -> None:
    """A script that never closes the sessions llmsql opened for it exits quietly: no
    'nanobind: leaked N instances' report about DuckDB objects they held."""
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPTS[name]], capture_output=True,
                          text=True, timeout=120, check=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert done.stdout.split()[:1] == ["1"]
    assert "leaked" not in done.stderr, done.stderr[:2000]
