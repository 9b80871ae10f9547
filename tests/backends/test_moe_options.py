"""The transformers backend with expert offload options (issue 15), on a tiny random-weight
Mixtral folder with SmolLM2's tokenizer (tests/moe_fixtures.py): a SQL query gives the same
answers with and without ``expert_cache`` (float32 on the CPU), EXPLAIN shows the chosen plan
and ANALYZE what offload measured; a dense model or a bad cache is a ConfigError, never a
BackendError.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import llmsql
from llmsql.backends import BackendSpec, Request
from llmsql.backends.transformers import TransformersBackend
from llmsql.errors import ConfigError
from tests.moe_fixtures import dense_folder, write_tiny_moe

pytest.importorskip("llmsql.engine.moe.offload", reason="the expert offload engine is missing")

REVIEWS = pd.DataFrame({"id": range(8), "review": [
    "Great fun", "Too sweet", "Tense", "Great fun", "Long", "Odd", "A delight", "Dull"]})
SQL = ("SELECT id, LLM_SCORE('Is the review positive?', review) AS p, "
       "LLM('Describe it', review, max_tokens => 5) AS d FROM reviews "
       "WHERE LLM_FILTER('Is it short?', review) ORDER BY id")
BASE = {"backend": "transformers", "progress": False, "cache": False, "threads": 1,
        "dtype": "float32"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_moe(tmp_path_factory.mktemp("moe") / "tiny-mixtral"))


def _run(model: str, sql: str = SQL, **options: Any) -> tuple[list[dict[str, Any]], Any]:
    with llmsql.connect(model=model, **BASE, **options) as con:
        con.register("reviews", REVIEWS)
        rows = con.sql(sql).arrow().to_pylist()
        explained = con.explain(sql, analyze=True)
        return rows, explained


def test_sql_answers_equal_with_and_without_offload(tiny: str) -> None:
    want, _ = _run(tiny)
    got, explained = _run(tiny, expert_cache=0.5, moe_plan="lru", predictor="none")
    assert [(r["id"], r["d"]) for r in got] == [(r["id"], r["d"]) for r in want]
    assert [r["p"] for r in got] == pytest.approx([r["p"] for r in want], abs=1e-5)
    assert len(want) > 0 and len({r["d"] for r in want}) > 1  # not one answer for all
    # ANALYZE: what offload measured per call (its GPU cache is half the experts)
    measured = [c.moe for c in explained.calls]
    assert all(m is not None and m.startswith("moe measured: hit rate ") for m in measured)
    assert "moe measured: hit rate" in explained.text


@pytest.mark.parametrize("options", [
    {"expert_cache": 0.25, "moe_plan": "predictive", "predictor": "next_router"},
    {"expert_cache": "100%"},
])
def test_other_plans_give_the_same_answers(tiny: str, options: dict[str, Any]) -> None:
    sql = "SELECT id, LLM('Describe it', review, max_tokens => 4) AS d FROM reviews ORDER BY id"
    want, _ = _run(tiny, sql)
    got, _ = _run(tiny, sql, **options)
    assert got == want


def test_explain_shows_the_plan_with_its_figures(tiny: str) -> None:
    with llmsql.connect(model=tiny, dry_run=True, expert_cache=0.5, **{
            k: v for k, v in BASE.items() if k != "threads"}) as con:
        con.register("reviews", REVIEWS)
        # the dry run's LLM_FILTER passes every row, so every call has rows to plan
        text = con.explain(SQL).text
    lines = [x.strip() for x in text.splitlines() if x.strip().startswith("moe plan=")]
    assert len(lines) == 3  # one per LLM call
    for line in lines:
        assert "slots=4/8" in line  # half of 2 layers x 4 experts
        assert "expected hit rate" in line and "MB moved per token at" in line
        assert "predictor next_router, accuracy 50% assumed, lookahead 2" in line


def test_explain_uses_a_stored_profiles_precision(tiny: str, tmp_path: Path) -> None:
    profile = tmp_path / "p.pt"
    profile.with_suffix(".json").write_text(json.dumps({"metrics": {"distances": [
        {"distance": 1, "precision": 0.81}, {"distance": 2, "precision": 0.7}]}}))
    with llmsql.connect(model=tiny, dry_run=True, expert_cache=0.5,
                        moe_profile=str(profile), backend="transformers") as con:
        con.register("reviews", REVIEWS)
        text = con.explain("SELECT LLM_FILTER('Good?', review) FROM reviews").text
    assert f"predictor learned, measured precision 81% ({profile})" in text


def test_the_backend_reports_offload_statistics_and_closes_them(tiny: str) -> None:
    spec = BackendSpec.make("transformers", tiny, threads=1, dtype="float32", expert_cache=0.5)
    backend = TransformersBackend(spec)
    try:
        before = backend.moe_stats()
        assert before is not None
        backend.generate([Request("Hello there", max_tokens=3)])
        after = backend.moe_stats()
        assert after is not None and after.needed > before.needed
    finally:
        backend.close()
    plain = TransformersBackend(BackendSpec.make("transformers", tiny, threads=1))
    try:
        assert plain.moe_stats() is None
    finally:
        plain.close()


def test_a_dense_model_with_expert_cache_is_a_config_error() -> None:
    folder = dense_folder()
    with pytest.raises(ConfigError, match=f"model {folder}: llama is not a mixture-of-experts "
                       "model.*drop expert_cache"):
        TransformersBackend(BackendSpec.make("transformers", None, expert_cache=0.5))


def test_a_cache_below_top_k_is_a_config_error(tiny: str) -> None:
    with pytest.raises(ConfigError, match="fewer than one layer's top-k"):
        TransformersBackend(BackendSpec.make("transformers", tiny, expert_cache="1KB"))


def test_moe_options_without_expert_cache_are_a_config_error(tiny: str) -> None:
    with pytest.raises(ConfigError, match="moe_plan set without expert_cache"):
        TransformersBackend(BackendSpec.make("transformers", tiny, moe_plan="lru"))



def test_connect_refuses_the_embedded_dense_model_naming_it() -> None:
    folder = dense_folder()  # on disk, so connect() can read its config.json
    with pytest.raises(ConfigError, match=f"model {folder}: llama is not a mixture-of-experts "
                       "model.*drop expert_cache"):
        llmsql.connect(backend="transformers", expert_cache=0.4)
