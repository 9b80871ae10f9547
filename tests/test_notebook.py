"""The example notebook runs top to bottom on the embedded model, so it cannot rot.

It is executed in a real Jupyter kernel (nbclient + ipykernel) with a fresh result cache,
so every LLM call really reaches the model; the notebook's own cells assert that the
accessor, ``llmsql.sql`` and the ``%%llmsql`` magic agree.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "notebook.ipynb"


def _outputs(nb: nbformat.NotebookNode, mime: str) -> list[str]:
    return [str(o["data"][mime]) for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if mime in o.get("data", {})]


@pytest.mark.model
def test_example_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    monkeypatch.setenv("LLMSQL_CACHE", str(tmp_path / "results.sqlite"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    seconds = time.perf_counter() - start
    html = _outputs(nb, "text/html")
    assert any("<progress" in h and "tok/s" in h for h in html)  # the notebook progress bar
    assert any("<svg" in h and "expected cache hits" in h for h in html)  # EXPLAIN as HTML
    assert any("where the time went" in h for h in html)  # EXPLAIN ANALYZE
    assert seconds < 600, f"the notebook took {seconds:.0f}s; keep it small"
