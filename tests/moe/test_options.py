"""Expert offload options on the way in (issue 15): ``connect()`` keywords, ``SET llmsql.*``
and their checks reach the transformers backend's spec as backend options; bad values, MoE
options on other backends and on dense models fail at ``connect()`` / ``SET`` with a
ConfigError. No torch: model folders here hold only a ``config.json`` (all the checks read).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import llmsql
from llmsql.backends import BackendSpec
from llmsql.cache import model_key
from llmsql.errors import ConfigError

MIXTRAL = {"model_type": "mixtral", "num_hidden_layers": 2, "num_local_experts": 4,
           "num_experts_per_tok": 2, "hidden_size": 32, "intermediate_size": 64,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}
"""One expert: 3 * 32 * 64 * 4 bytes (float32 on the CPU) = 24,576 bytes; 8 experts in all."""
DENSE = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32,
         "intermediate_size": 64, "num_attention_heads": 4, "vocab_size": 100}


def _folder(root: Path, name: str, config: dict[str, object]) -> str:
    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.fixture
def moe_dir(tmp_path: Path) -> str:
    return _folder(tmp_path, "mixtral", MIXTRAL)


@pytest.fixture
def dense_dir(tmp_path: Path) -> str:
    return _folder(tmp_path, "llama", DENSE)


def _options(con: llmsql.Session) -> dict[str, object]:
    return dict(con.spec().options)


def test_connect_keywords_reach_the_backend_spec(moe_dir: str) -> None:
    with llmsql.connect(backend="transformers", model=moe_dir, dry_run=True, expert_cache="24GB",
                        moe_plan="layer_sweep", predictor="none", lookahead=3,
                        moe_profile="/tmp/p.pt") as con:
        spec = con.spec()
        assert spec.kind == "transformers"
        assert _options(con) == {"expert_cache": "24GB", "moe_plan": "layer_sweep",
                                 "predictor": "none", "lookahead": 3,
                                 "moe_profile": "/tmp/p.pt"}
        assert con.config.backend_options["expert_cache"] == "24GB"


def test_set_statements_change_the_backend_options(moe_dir: str) -> None:
    with llmsql.connect(backend="transformers", model=moe_dir, dry_run=True) as con:
        assert "expert_cache" not in _options(con)
        # moe_plan before expert_cache: each value is checked alone, in any order
        con.sql("SET llmsql.moe_plan = 'lru'; SET llmsql.expert_cache = '40%'")
        assert _options(con)["expert_cache"] == "40%"
        assert _options(con)["moe_plan"] == "lru"
        con.sql("SET llmsql.lookahead = 4")
        assert _options(con)["lookahead"] == 4
        assert dict(con.settings.moe) == {"moe_plan": "lru", "expert_cache": "40%",
                                          "lookahead": 4}
        con.sql("SET llmsql.predictor = 'none'")  # a predictor's name, not NULL
        assert _options(con)["predictor"] == "none"
        con.set("expert_cache", None)
        assert "expert_cache" not in _options(con)


def test_set_overrides_connect_and_null_removes(moe_dir: str) -> None:
    with llmsql.connect(backend="transformers", model=moe_dir, dry_run=True,
                        expert_cache=0.5) as con:
        con.sql("SET llmsql.expert_cache = 0.25")
        assert _options(con)["expert_cache"] == 0.25
        con.sql("SET llmsql.expert_cache = NULL")
        assert "expert_cache" not in _options(con)


def test_a_changed_option_rebuilds_the_backend_an_unchanged_one_does_not(moe_dir: str) -> None:
    with llmsql.connect(backend="transformers", model=moe_dir, dry_run=True,
                        expert_cache=0.5) as con:
        first = con.backend()
        con.set("expert_cache", 0.5)
        assert con.backend() is first
        con.set("moe_plan", "lru")
        second = con.backend()
        assert second is not first
        assert ("moe_plan", "lru") in second._spec.options  # built from the new spec


@pytest.mark.parametrize(("options", "message"), [
    ({"expert_cache": "lots"}, "expert_cache='lots'"),
    ({"expert_cache": -3}, "expert_cache=-3"),
    ({"expert_cache": 1.5}, r"share of the experts is in \(0, 1\]"),
    ({"expert_cache": 0.5, "moe_plan": "fastest"}, "moe_plan='fastest': choose one of auto"),
    ({"expert_cache": 0.5, "predictor": "psychic"}, "predictor='psychic': choose one of"),
    ({"expert_cache": 0.5, "lookahead": 0}, "lookahead=0: give a whole number from 1 to 8"),
    ({"moe_plan": "lru"}, "moe_plan set without expert_cache"),
    ({"lookahead": 2, "predictor": "none"}, "lookahead, predictor set without expert_cache"),
])
def test_bad_values_fail_at_connect(moe_dir: str, options: dict[str, object],
                                    message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        llmsql.connect(backend="transformers", model=moe_dir, dry_run=True, **options)


@pytest.mark.parametrize(("name", "value", "message"), [
    ("expert_cache", "24 parsecs", "expert_cache='24 parsecs'"),
    ("moe_plan", "zigzag", "moe_plan='zigzag'"),
    ("predictor", "oracle", "predictor='oracle'"),
    ("lookahead", 0, "lookahead=0"),
    ("lookahead", 9, "lookahead=9"),
])
def test_bad_values_fail_at_set_and_change_nothing(moe_dir: str, name: str, value: object,
                                                   message: str) -> None:
    with llmsql.connect(backend="transformers", model=moe_dir, dry_run=True,
                        expert_cache=0.5) as con:
        before = _options(con)
        with pytest.raises(ConfigError, match=message):
            con.set(name, value)
        assert _options(con) == before


@pytest.mark.parametrize("backend", ["vllm", "openai"])
def test_moe_options_on_other_backends_are_refused(backend: str) -> None:
    with pytest.raises(ConfigError, match=f"expert_cache given for the {backend} backend: "
                       "expert offload runs on the transformers backend"):
        llmsql.connect(backend=backend, dry_run=True, expert_cache="24GB")


def test_set_on_another_backend_is_refused() -> None:
    with llmsql.connect(backend="openai", model="m", dry_run=True) as con, pytest.raises(
            ConfigError, match="expert offload runs on the transformers backend"):
        con.sql("SET llmsql.expert_cache = '24GB'")


def test_a_dense_model_is_refused_naming_it(dense_dir: str) -> None:
    with pytest.raises(ConfigError, match=f"model {dense_dir}: llama is not a "
                       "mixture-of-experts model.*drop expert_cache"):
        llmsql.connect(backend="transformers", model=dense_dir, dry_run=True, expert_cache=0.4)
    with llmsql.connect(backend="transformers", model=dense_dir, dry_run=True) as con, \
            pytest.raises(ConfigError, match="not a mixture-of-experts model"):
        con.sql("SET llmsql.expert_cache = '1GB'")


def test_a_cache_below_one_layers_top_k_names_the_minimum(moe_dir: str) -> None:
    with pytest.raises(ConfigError, match=r"holds 1 experts, fewer than one layer's top-k \(2\)"
                       r": give at least 2 experts \(0.00 GB, or a share of 0.250\)"):
        llmsql.connect(backend="transformers", model=moe_dir, dry_run=True, expert_cache=30000)


def test_unknown_setting_lists_the_moe_settings() -> None:
    with llmsql.connect(dry_run=True) as con, pytest.raises(
            ConfigError, match="llmsql.expert_cache, llmsql.moe_plan, llmsql.predictor"):
        con.set("expert_cash", "1GB")


def test_offload_options_are_not_part_of_the_result_cache_identity(moe_dir: str) -> None:
    plain = BackendSpec.make("transformers", moe_dir, dtype="float32")
    offloaded = BackendSpec.make("transformers", moe_dir, dtype="float32", expert_cache=0.5,
                                 moe_plan="lru", predictor="none", lookahead=3)
    assert model_key(offloaded) == model_key(plain)
    assert model_key(BackendSpec.make("transformers", moe_dir, dtype="bfloat16")) != \
        model_key(plain)


def test_explain_shows_the_plan_per_call_without_torch(moe_dir: str) -> None:
    import subprocess
    import sys

    code = (
        "import sys, llmsql\n"
        f"con = llmsql.connect(backend='transformers', model={moe_dir!r}, dry_run=True,\n"
        "                      expert_cache=0.5, moe_plan='lru')\n"
        "text = con.explain(\"SELECT LLM_FILTER('Good?', a) FROM (VALUES ('x'), ('y')) t(a)\")"
        ".text\n"
        "print(text)\n"
        "assert 'torch' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    line = next(x.strip() for x in out.splitlines() if "moe plan=" in x)
    # 4 of 8 experts of 24,576 bytes (float32 on the CPU) on the GPU; a reactive cache
    assert line.startswith("moe plan=lru slots=4/8 (0.0 GiB) expected hit rate ")
    assert "MB moved per token at " in line
    assert line.endswith("(chosen); predictor none, lookahead 2")
