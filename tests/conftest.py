"""Shared fixtures: real DuckDB sessions, the real embedded model (marked), sample data."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

import llmsql

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMSQL_SHARED", ROOT.parent / "shared"))
DATASETS = SHARED / "datasets"
SAMPLE = ROOT / "examples" / "data" / "squad_sample.parquet"


@pytest.fixture(scope="session", autouse=True)
def _private_result_cache(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Tests never read or write the user's result cache (a re-run would answer from it)."""
    old = os.environ.get("LLMSQL_CACHE")
    os.environ["LLMSQL_CACHE"] = str(tmp_path_factory.mktemp("llmsql-cache") / "results.sqlite")
    yield
    if old is None:
        os.environ.pop("LLMSQL_CACHE", None)
    else:
        os.environ["LLMSQL_CACHE"] = old


@pytest.fixture
def reviews() -> pd.DataFrame:
    """A small table with repeated movie fields, a join key and NULLs."""
    return pd.DataFrame(
        {
            "id": [1, 2, 3, 4, 5, 6],
            "movie": ["Up", "Up", "Heat", "Heat", "Heat", None],
            "genre": ["animation", "animation", "crime", "crime", "crime", "drama"],
            "review": ["Great fun", "Too sweet", "Tense", "Great fun", "Long", "Odd"],
            "stars": [5, 2, 4, 5, 3, 1],
        }
    )


@pytest.fixture
def dry(reviews: pd.DataFrame):  # type: ignore[no-untyped-def]
    """A dry-run session (fixed valid answers, no model) with ``reviews`` registered."""
    con = llmsql.connect(dry_run=True, progress=False)
    con.register("reviews", reviews)
    yield con
    con.close()


@pytest.fixture
def rule():  # type: ignore[no-untyped-def]
    """The deterministic answer function of tests/answers.py, fresh per test."""
    from tests.answers import RuleBackend

    return RuleBackend()


@pytest.fixture(scope="session")
def model_session():  # type: ignore[no-untyped-def]
    """One real transformers session on the embedded SmolLM2 model for the whole test run."""
    con = llmsql.connect(backend="transformers", progress=False)
    yield con
    con.close()
