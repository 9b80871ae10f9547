"""The package's structure holds (docs/architecture.md): layered imports, no cycles, no
engine imports on ``import llmsql``, long modules say why they are long."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scripts import import_graph

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph.graph()


def test_every_module_has_a_layer(graph: dict[str, set[str]]) -> None:
    for module in graph:
        import_graph.layer_of(module)  # raises KeyError naming the module


def test_no_import_runs_from_a_lower_layer_to_a_higher_one(graph: dict[str, set[str]]) -> None:
    assert import_graph.upward_imports(graph) == []


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    assert import_graph.cycles(graph) == []


def test_the_checks_catch_what_they_look_for() -> None:
    """The checks find an upward import and a cycle when there is one."""
    g = {"llmsql.errors": {"llmsql.session"}, "llmsql.session": {"llmsql.errors"}}
    assert import_graph.upward_imports(g) == [
        "llmsql.errors (foundations) imports llmsql.session (session)"]
    assert import_graph.cycles(g) == [["llmsql.errors", "llmsql.session"]]


def test_import_llmsql_loads_no_engine() -> None:
    code = ("import sys, llmsql, llmsql.step, llmsql.executors, llmsql.optimizer; "
            "print(sorted(m for m in ('torch', 'vllm', 'pyspark', 'transformers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_long_modules_say_why() -> None:
    """STYLE.md: a module over about 500 lines carries a written reason ("500 lines")."""
    silent = []
    for path in sorted((ROOT / "llmsql").rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > 500 and "500 lines" not in text and "500-line" not in text:
            silent.append(str(path.relative_to(ROOT)))
    assert silent == []


def test_the_drawing_in_the_docs_is_current(graph: dict[str, set[str]]) -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    assert import_graph.mermaid(graph) in doc, (
        "docs/architecture.md's graph is stale: python scripts/import_graph.py --mermaid")


def test_spark_puts_the_checkout_on_the_path() -> None:
    """Spark's Python workers get the folder holding ``llmsql/`` on PYTHONPATH (a module
    moved a level deeper must count one more parent)."""
    from llmsql.executors.spark.session import _package_root

    assert (Path(_package_root()) / "llmsql" / "__init__.py").is_file()


def test_the_code_passes_ruff() -> None:
    """pyproject.toml's [tool.ruff] rules (STYLE.md's set, each ignore justified there)."""
    ruff = Path(sys.executable).with_name("ruff")
    out = subprocess.run([str(ruff) if ruff.exists() else "ruff", "check", "llmsql", "tests",
                          "bench", "examples", "scripts"], capture_output=True, text=True,
                         cwd=ROOT, check=False)
    assert out.returncode == 0, out.stdout[-3000:]
