"""The command line's expert offload (issue 15): ``--expert-cache`` and its sibling flags reach
the backend options (EXPLAIN shows the plan they give), bad values exit 1 with the option's
message, and ``llmsql moe-profile`` records a tiny MoE model's routing on a query's own
prompts and stores the trained predictor, with its measured figures, next to the model."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from llmsql.cli import main
from tests.moe.test_options import DENSE, MIXTRAL

QUERY = "SELECT id FROM reviews WHERE LLM_FILTER('Is the review positive?', review)"
VALUES = ("(SELECT * FROM (VALUES (1, 'Great fun'), (2, 'Too sweet'), (3, 'Tense'), "
          "(4, 'Long and dull'), (5, 'Odd but good')) t(id, review))")
INLINE = QUERY.replace("FROM reviews", f"FROM {VALUES} AS reviews")


def _config_folder(root: Path, config: dict[str, object]) -> str:
    root.mkdir()
    (root / "config.json").write_text(json.dumps(config))
    return str(root)


def _explain(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["explain", "--backend", "transformers", "-e", INLINE, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_flags_reach_the_backend_and_explain_shows_the_plan(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _config_folder(tmp_path / "mixtral", MIXTRAL)
    code, out, err = _explain(capsys, "--model", model, "--expert-cache", "0.5", "--moe-plan",
                              "lru", "--predictor", "none", "--lookahead", "3")
    assert code == 0, err
    line = next(x.strip() for x in out.splitlines() if "moe plan=" in x)
    assert line.startswith("moe plan=lru slots=4/8 ")
    assert line.endswith("predictor none, lookahead 3")


def test_set_flag_gives_the_same_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    model = _config_folder(tmp_path / "mixtral", MIXTRAL)
    code, out, err = _explain(capsys, "--model", model, "--set", "expert_cache=0.25",
                              "--set", "moe_plan=layer_sweep")
    assert code == 0, err
    assert "moe plan=layer_sweep slots=2/8 " in out


@pytest.mark.parametrize(("args", "message"), [
    (["--expert-cache", "plenty"], "expert_cache='plenty'"),
    (["--expert-cache", "0.5", "--lookahead", "0"], "lookahead=0: give a whole number"),
    (["--expert-cache", "0.5", "--moe-plan", "magic"], "moe_plan='magic': choose one of"),
    (["--moe-plan", "lru"], "moe_plan set without expert_cache"),
])
def test_bad_flags_exit_1_with_the_options_message(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
        ) -> None:
    model = _config_folder(tmp_path / "mixtral", MIXTRAL)
    code, _, err = _explain(capsys, "--model", model, *args)
    assert code == 1
    assert message in err


def test_other_backends_and_dense_models_are_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["explain", "--backend", "vllm", "-e", INLINE, "--expert-cache", "24GB"])
    assert code == 1
    assert "expert offload runs on the transformers backend" in capsys.readouterr().err
    dense = _config_folder(tmp_path / "llama", DENSE)
    code, _, err = _explain(capsys, "--model", dense, "--expert-cache", "0.4")
    assert code == 1
    assert f"model {dense}: llama is not a mixture-of-experts model" in err
    assert "drop expert_cache" in err
    code = main(["moe-profile", "--model", dense, "--sql", INLINE])
    assert code == 1
    assert "not a mixture-of-experts model" in capsys.readouterr().err
    code = main(["serve", "--backend", "vllm", "--expert-cache", "1GB", "--port", "0"])
    assert code == 1
    assert "expert offload runs on the transformers backend" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("llmsql.engine.moe.learned", reason="the predictor trainer is missing")
    from tests.moe_fixtures import write_tiny_moe

    return write_tiny_moe(tmp_path_factory.mktemp("moe") / "tiny-mixtral")


def test_moe_profile_stores_the_predictor_next_to_the_model(
        tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    database = tmp_path / "reviews.duckdb"
    con = duckdb.connect(str(database))
    con.execute(f"CREATE TABLE reviews AS SELECT * FROM {VALUES}")
    con.close()
    code = main(["moe-profile", "--model", str(tiny), "--database", str(database), "--sql",
                 QUERY, "--rows", "4", "--lookahead", "1"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "recorded routing of 4 prompts" in out.out
    assert "1 layer(s) ahead: precision " in out.out
    saved = tiny / "llmsql_moe" / "predictor.pt"
    metrics = json.loads(saved.with_suffix(".json").read_text())["metrics"]
    assert saved.is_file() and metrics["lookahead"] == 1
    precision = metrics["distances"][0]["precision"]
    # predictor='auto' plans with the stored profile's measured precision
    code, text, err = _explain(capsys, "--model", str(tiny), "--expert-cache", "0.5")
    assert code == 0, err
    assert f"predictor learned, measured precision {precision:.0%} ({saved})" in text


def test_moe_profile_reads_a_prompts_file_and_writes_where_told(
        tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Review {i}: fine"}) for i in range(6))
                       + "\nplain text prompt\n")
    out = tmp_path / "elsewhere" / "pred.pt"
    code = main(["moe-profile", "--model", str(tiny), "--prompts", str(prompts), "--out",
                 str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "recorded routing of 7 prompts" in printed.out
    assert out.is_file() and out.with_suffix(".json").is_file()
