"""Adapters through the session, the CLI and the DataFrame API, without training (no model):
the training examples are the call's own requests with the label as its answer, bad labels and
bad names are clear errors naming the value and the row, ``adapter => 'name'`` resolves only a
ready adapter of the query's base model, cache keys include the adapter, EXPLAIN names it."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

import llmsql
from llmsql.adapters import AdapterCatalog, CreateAdapter, parse_adapter_statement
from llmsql.adapters.catalog import SHOW_COLUMNS
from llmsql.backends.base import AdapterRef, Request
from llmsql.backends.dry_run import DryRunBackend
from llmsql.cache import request_key
from llmsql.cli import main
from llmsql.errors import ConfigError, PlanError
from llmsql.optimizer import RuleContext
from llmsql.step.adapter_runs import weights_digest
from llmsql.step.training import answer_text, build_examples, call_requests, training_call

FILTER = "LLM_FILTER('Is this review positive? Answer Yes or No.', review)"


def create(call: str = FILTER, label: str = "label", tail: str = "", using: str = "",
           name: str = "fresh") -> CreateAdapter:
    s = parse_adapter_statement(
        f"CREATE ADAPTER {name} FOR {call} {using} AS SELECT review, {label} FROM t {tail}")
    assert isinstance(s, CreateAdapter)
    return s


def rows(labels: list[object], reviews: list[str] | None = None,
         label_type: pa.DataType | None = None) -> pa.Table:
    reviews = reviews or [f"review {i}" for i in range(len(labels))]
    return pa.table({"review": reviews, "label": pa.array(labels, label_type)})


@pytest.fixture
def con(tmp_path: Path):  # type: ignore[no-untyped-def]
    c = llmsql.connect(dry_run=True, progress=False, adapters=tmp_path / "adapters")
    c.register("t", pd.DataFrame({"id": [1, 2, 3], "review": ["great", "bad", "fine"],
                                  "label": [True, False, True]}))
    yield c
    c.close()


def ready_adapter(con: llmsql.Session, name: str = "fresh", *, base: str | None = None,
                  status: str = "ready") -> Path:
    """An adapter record as a finished CREATE leaves it (weights are a folder of files)."""
    cat = AdapterCatalog(con.config.adapters)  # type: ignore[arg-type]
    rec = cat.new_record(create(name=name), base_model=base or con._identity(None))
    cat.create(rec)
    weights = Path(rec.path)
    weights.mkdir(parents=True)
    (weights / "adapter_config.json").write_text("{}")
    cat.update(name, status=status, digest=weights_digest(weights) if status == "ready" else "",
               reason="" if status == "ready" else "it broke")
    return weights


# ---- examples: the call's requests, the label as its answer ---------------------------------


def test_examples_are_the_requests_the_query_sends(con: llmsql.Session) -> None:
    backend = DryRunBackend()
    stmt = create(using="USING LORA (holdout => 0)")
    call = training_call(stmt)
    data = rows(["yes", "No", "TRUE", "false"], ["great", "bad", "fine", "meh"])
    ex = build_examples(stmt, call, data, backend, RuleContext(capabilities=backend.capabilities))
    sent = con.explain(f"SELECT {FILTER} FROM (SELECT unnest(['great', 'bad', 'fine', 'meh']) "
                       "AS review)").prompts
    assert sorted(e.request.prompt for e in ex.train) == sorted(sent)
    assert [e.answer for e in ex.train] == ["Yes", "No", "Yes", "No"]
    assert all(e.request.choices == ("Yes", "No") and e.request.adapter is None for e in ex.train)


def test_holdout_rows_keep_their_expected_values() -> None:
    backend = DryRunBackend()
    stmt = create(using="USING LORA (holdout => 0.25, seed => 3)")
    ex = build_examples(stmt, training_call(stmt), rows([True, False] * 4), backend,
                        RuleContext(capabilities=backend.capabilities))
    assert (len(ex.train), len(ex.holdout)) == (6, 2)
    assert list(ex.holdout_expected) == [e.answer == "Yes" for e in ex.holdout]


@pytest.mark.parametrize(("value", "answer"), [(True, "Yes"), (0, "No"), ("YES", "Yes"),
                                               (" false ", "No"), (2, None), ("maybe", None),
                                               (None, None), (0.5, None)])
def test_filter_labels(value: object, answer: str | None) -> None:
    call = training_call(create())
    assert answer_text(call, value, ("Yes", "No")) == answer


def test_classify_extract_and_map_labels() -> None:
    cls = training_call(create("LLM_CLASSIFY('Tone?', review, labels => ['pos', 'neg'])"))
    assert answer_text(cls, "POS", None) == "pos"
    assert answer_text(cls, "neutral", None) is None
    ext = training_call(create("LLM_EXTRACT('Who?', review, schema => 'name VARCHAR, n INT')"))
    assert json.loads(answer_text(ext, {"n": 3, "name": "Al"}, None) or "") == {"name": "Al",
                                                                                "n": 3}
    assert answer_text(ext, '{"name": "Al"}', None) is None
    gen = training_call(create("LLM('Summarize.', review)"))
    assert answer_text(gen, "Short.", None) == "Short."
    assert answer_text(gen, "  ", None) is None


@pytest.mark.parametrize(("labels", "ltype", "words"), [
    (["yes", "perhaps"], None, ["row 2", "'perhaps'", "truth value"]),
    ([True, None], None, ["row 2", "None"]),
    ([1.5, 0.0], pa.float64(), ["type double", "cast"]),
    ([], pa.bool_(), ["no rows", "nothing to train on"]),
])
def test_bad_labels_name_the_value_and_row(labels: list[object], ltype: pa.DataType | None,
                                           words: list[str]) -> None:
    backend = DryRunBackend()
    stmt = create()
    with pytest.raises(PlanError) as err:
        build_examples(stmt, training_call(stmt), rows(labels, [f"r{i}" for i in
                                                                range(len(labels))], ltype),
                       backend, RuleContext(capabilities=backend.capabilities))
    for w in words:
        assert w in str(err.value)


def test_classify_label_must_be_one_of_the_labels() -> None:
    backend = DryRunBackend()
    stmt = create("LLM_CLASSIFY('Tone?', review, labels => ['pos', 'neg'])")
    with pytest.raises(PlanError, match=r"row 2 .*'meh'.*\['pos', 'neg'\]"):
        build_examples(stmt, training_call(stmt), rows(["pos", "meh"]), backend,
                       RuleContext(capabilities=backend.capabilities))


def test_call_requests_carry_the_adapter() -> None:
    backend = DryRunBackend()
    ref = AdapterRef("fresh", "/x", "d1")
    reqs = call_requests(training_call(create()), rows([True]), backend,
                         RuleContext(capabilities=backend.capabilities), ref)
    assert reqs[0].adapter == ref


# ---- the session: statements, names, states, base model --------------------------------------


def test_a_backend_that_cannot_train_is_a_config_error(con: llmsql.Session) -> None:
    with pytest.raises(ConfigError, match="cannot .*dry run"):
        con.sql(f"CREATE ADAPTER fresh FOR {FILTER} AS SELECT review, label FROM t")
    assert con.adapters() == ()


def test_show_adapters_is_a_table(con: llmsql.Session) -> None:
    assert con.sql("SHOW ADAPTERS").arrow().column_names == list(SHOW_COLUMNS)
    ready_adapter(con)
    table = con.sql("SHOW ADAPTERS;").arrow()
    assert table.column("name").to_pylist() == ["fresh"]
    assert table.column("status").to_pylist() == ["ready"]
    assert [r.name for r in con.adapters()] == ["fresh"]


def test_drop_adapter(con: llmsql.Session) -> None:
    weights = ready_adapter(con)
    assert con.sql("DROP ADAPTER fresh").arrow().to_pylist() == [{"name": "fresh",
                                                                  "dropped": True}]
    assert not weights.exists() and con.adapters() == ()
    assert con.sql("DROP ADAPTER IF EXISTS fresh").arrow().column("dropped").to_pylist() == [
        False]
    with pytest.raises(PlanError, match="unknown adapter 'fresh'"):
        con.drop_adapter("fresh")


def test_unknown_adapter_in_a_query(con: llmsql.Session) -> None:
    ready_adapter(con, "other")
    with pytest.raises(PlanError, match="unknown adapter 'nope'.*other"):
        con.sql("SELECT LLM_FILTER('Good?', review, adapter => 'nope') FROM t")


@pytest.mark.parametrize("value", ["5", "''", "true"])
def test_adapter_option_must_be_a_name(con: llmsql.Session, value: str) -> None:
    with pytest.raises(PlanError, match="option 'adapter' must be an adapter's name"):
        con.sql(f"SELECT LLM('Good?', review, adapter => {value}) FROM t")


def test_for_call_cannot_name_an_adapter() -> None:
    with pytest.raises(PlanError, match="remove adapter =>"):
        create("LLM_FILTER('Fresh?', review, adapter => 'x')")


@pytest.mark.parametrize(("status", "words"), [("training", "still training"),
                                               ("failed", "failed (it broke)"),
                                               ("incomplete", "resume")])
def test_an_adapter_not_ready_is_refused_with_what_to_do(con: llmsql.Session, status: str,
                                                         words: str) -> None:
    ready_adapter(con, status=status)
    with pytest.raises(PlanError, match=re.escape(words)):
        con.sql("SELECT LLM_FILTER('Good?', review, adapter => 'fresh') FROM t")


def test_an_adapter_of_another_base_model_is_refused(con: llmsql.Session) -> None:
    ready_adapter(con, base="transformers:/models/other:123")
    with pytest.raises(PlanError, match="trained for base model 'transformers:/models/other"):
        con.sql("SELECT LLM_FILTER('Good?', review, adapter => 'fresh') FROM t")


def test_dry_run_query_and_explain_name_the_adapter(con: llmsql.Session) -> None:
    ready_adapter(con)
    q = ("SELECT id FROM t WHERE LLM_FILTER('Good?', review, adapter => 'fresh') AND "
         "LLM_FILTER('Long?', review)")
    assert con.sql(q).arrow().num_rows == 3
    text = con.explain(q).text
    assert text.count("adapter: fresh") == 1


def test_per_row_adapter_through_case(con: llmsql.Session) -> None:
    ready_adapter(con)
    q = ("SELECT id, CASE WHEN id > 1 THEN LLM_FILTER('Good?', review, adapter => 'fresh') "
         "ELSE LLM_FILTER('Good?', review) END AS ok FROM t ORDER BY id")
    assert con.sql(q).arrow().column("ok").to_pylist() == [True, True, True]
    assert con.explain(q).text.count("adapter: fresh") == 1


def test_a_backend_without_adapters_is_a_config_error(tmp_path: Path) -> None:
    # a backend object that runs no adapters (the dry-run backend, used as a real backend)
    con = llmsql.connect(backend=DryRunBackend(), progress=False, adapters=tmp_path)
    con.register("t", pd.DataFrame({"review": ["great"]}))
    ready_adapter(con)
    with pytest.raises(ConfigError, match="cannot run LoRA adapters"):
        con.sql("SELECT LLM_FILTER('Good?', review, adapter => 'fresh') FROM t")
    assert con.sql("SELECT LLM_FILTER('Good?', review) AS ok FROM t").arrow().num_rows == 1
    with pytest.raises(ConfigError, match="cannot"):
        con.sql(f"CREATE ADAPTER fresh2 FOR {FILTER} AS SELECT review, true AS l FROM t")
    con.close()


def test_slo_setting(con: llmsql.Session) -> None:
    con.sql("SET llmsql.slo_tpot_ms = 40")
    assert con._slo_tpot_ms == 40.0
    con.set("slo_tpot_ms", None)
    assert con._slo_tpot_ms is None
    with pytest.raises(ConfigError, match="slo_tpot_ms"):
        con.sql("SET llmsql.slo_tpot_ms = -3")
    with pytest.raises(ConfigError, match="slo_tpot_ms"):
        llmsql.connect(dry_run=True, slo_tpot_ms=0)


def test_default_folder_is_next_to_the_database(tmp_path: Path) -> None:
    con = llmsql.connect(dry_run=True, database=str(tmp_path / "db.duckdb"))
    assert con._adapters().catalog.folder == tmp_path / "db.duckdb.adapters"
    con.close()


def test_cache_keys_include_the_adapter_digest() -> None:
    plain = Request("p")
    a1 = dataclasses.replace(plain, adapter=AdapterRef("a", "/x", "d1"))
    a2 = dataclasses.replace(plain, adapter=AdapterRef("a", "/x", "d2"))
    keys = {request_key("m", r) for r in (plain, a1, a2)}
    assert len(keys) == 3
    assert request_key("m", a1) == request_key("m", dataclasses.replace(
        a1, adapter=AdapterRef("renamed", "/y", "d1")))


# ---- CLI and DataFrame --------------------------------------------------------------------


def test_cli_lists_shows_and_drops(con: llmsql.Session, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    folder = str(con.config.adapters)
    assert main(["adapters", "--adapters", folder]) == 0
    assert "no adapters" in capsys.readouterr().err
    ready_adapter(con)
    assert main(["adapters", "--adapters", folder]) == 0
    assert "fresh" in capsys.readouterr().out
    assert main(["run", "--dry-run", "--adapters", folder, "-e",
                 "SHOW ADAPTERS; DROP ADAPTER fresh; SHOW ADAPTERS"]) == 0
    assert "ready" in capsys.readouterr().out
    assert con.adapters() == ()
    assert main(["run", "--dry-run", "--adapters", folder, "-e",
                 f"CREATE ADAPTER x FOR {FILTER} AS SELECT 'a' AS review, true AS l"]) == 1
    assert "cannot" in capsys.readouterr().err


def test_dataframe_adapter_option_and_create(con: llmsql.Session) -> None:
    ready_adapter(con)
    df = pd.DataFrame({"review": ["great", "bad"], "fresh": [True, False]})
    assert df.llm.filter("Good?", "review", adapter="fresh", session=con)["review"].tolist() == [
        "great", "bad"]
    with pytest.raises(PlanError, match="unknown adapter 'nope'"):
        df.llm.map("Say.", "review", adapter="nope", session=con)
    with pytest.raises(ConfigError, match="cannot"):
        df.llm.create_adapter("fresh2", "Good?", "review", label="fresh", session=con)
    with pytest.raises(PlanError, match="function must be one of"):
        df.llm.create_adapter("fresh2", "Good?", "review", label="fresh", function="agg",
                              session=con)
