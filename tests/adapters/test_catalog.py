"""The adapter catalog (llmsql.adapters.catalog, no torch): records round-trip through their
JSON files, a second CREATE of a name changes nothing, unknown names and other base models are
clear errors, and a failed write (a full disk, a failing rename) leaves the previous record in
use and no half-written file behind."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
from pathlib import Path

import pytest

from llmsql.adapters import AdapterCatalog, AdapterRecord, CreateAdapter, check_base_model
from llmsql.adapters.catalog import SHOW_COLUMNS, STATUSES, default_folder
from llmsql.adapters.statements import parse_adapter_statement
from llmsql.errors import ConfigError, ExecutionError, PlanError

BASE = "transformers:/models/SmolLM2-135M:abc123"


def stmt(name: str = "fresh", rank: int = 16, call: str = "LLM_FILTER('Fresh?', review)",
         ) -> CreateAdapter:
    s = parse_adapter_statement(
        f"CREATE ADAPTER {name} FOR {call} USING LORA (rank => {rank}, lr => 1e-3) "
        "AS SELECT review, label FROM rt WHERE split = 'train'")
    assert isinstance(s, CreateAdapter)
    return s


@pytest.fixture
def cat(tmp_path: Path) -> AdapterCatalog:
    return AdapterCatalog(tmp_path / "adapters")


def leftovers(cat: AdapterCatalog) -> list[str]:
    return sorted(p.name for p in cat.folder.iterdir() if p.name.startswith("."))


def test_record_round_trips_through_a_fresh_catalog(cat: AdapterCatalog) -> None:
    call = "LLM_EXTRACT('Facts', review, schema => 'year INTEGER, who VARCHAR', seed => 3)"
    made = cat.create(cat.new_record(stmt(call=call), base_model=BASE))
    assert made.status == "training" and made.path == str(cat.folder / "fresh")
    done = cat.update("fresh", status="ready", loss_curve=[[1, 0.9], [2, 0.5]],
                      metrics={"accuracy_after": 0.8, "accuracy_before": 0.6})
    again = AdapterCatalog(cat.folder).get("fresh")
    assert again == done
    assert again.loss_curve == ((1, 0.9), (2, 0.5))
    assert again.metrics == (("accuracy_after", 0.8), ("accuracy_before", 0.6))
    assert again.call_options == stmt(call=call).call.options
    assert (again.kind, again.instruction, again.columns, again.label, again.lora.rank,
            again.lora.lr) == ("LLM_EXTRACT", "Facts", ("review",), "label", 16, 1e-3)
    on_disk = json.loads(cat.record_path("fresh").read_text())
    assert on_disk["status"] == "ready" and on_disk["base_model"] == BASE
    assert on_disk["format"] == 1 and on_disk["created"] == made.created


def test_show_row(cat: AdapterCatalog) -> None:
    cat.create(cat.new_record(stmt(rank=8), base_model=BASE))
    row = cat.update("fresh", loss_curve=[(1, 0.9), (5, 0.25)],
                     metrics={"accuracy_after": 0.75}).show_row()
    assert tuple(row) == SHOW_COLUMNS
    assert (row["status"], row["function"], row["rank"], row["steps"], row["loss"]) == (
        "training", "LLM_FILTER", 8, 5, 0.25)
    assert json.loads(str(row["metrics"])) == {"accuracy_after": 0.75}


def test_list_and_names(cat: AdapterCatalog) -> None:
    assert cat.list() == () and cat.names() == ()
    for name in ("zeta", "alpha", "mid"):
        cat.create(cat.new_record(stmt(name), base_model=BASE))
    assert cat.names() == ("alpha", "mid", "zeta")
    assert [r.name for r in cat.list()] == ["alpha", "mid", "zeta"]


def test_second_create_is_an_error_and_overwrites_nothing(cat: AdapterCatalog) -> None:
    cat.create(cat.new_record(stmt(rank=8), base_model=BASE))
    cat.update("fresh", status="ready", loss_curve=[(1, 0.3)])
    before = cat.record_path("fresh").read_bytes()
    for again in (stmt(rank=8), stmt(rank=32)):
        with pytest.raises(PlanError) as err:
            cat.create(cat.new_record(again, base_model=BASE))
        assert "already exists (ready" in str(err.value)
        assert "DROP ADAPTER fresh" in str(err.value) and "nothing was changed" in str(err.value)
    assert cat.record_path("fresh").read_bytes() == before
    assert leftovers(cat) == []


def test_another_catalog_on_the_same_folder_sees_the_adapter(cat: AdapterCatalog) -> None:
    cat.create(cat.new_record(stmt(), base_model=BASE))
    with pytest.raises(PlanError, match="already exists"):
        AdapterCatalog(cat.folder).create(cat.new_record(stmt(rank=4), base_model="other"))
    assert cat.get("fresh").lora.rank == 16


def test_unknown_name_lists_the_known_ones(cat: AdapterCatalog) -> None:
    with pytest.raises(PlanError, match="there are none yet; create one with CREATE ADAPTER"):
        cat.get("fresh")
    cat.create(cat.new_record(stmt("fresh"), base_model=BASE))
    cat.create(cat.new_record(stmt("spoiled"), base_model=BASE))
    with pytest.raises(PlanError) as err:
        cat.get("frsh")
    assert "unknown adapter 'frsh'" in str(err.value)
    assert "the adapters are fresh, spoiled" in str(err.value)
    with pytest.raises(PlanError, match="unknown adapter '../x'"):
        cat.get("../x")
    with pytest.raises(PlanError, match="unknown adapter"):
        cat.drop("frsh")
    assert cat.drop("frsh", if_exists=True) is False


def test_another_base_model_is_a_clear_error(cat: AdapterCatalog) -> None:
    rec = cat.create(cat.new_record(stmt(), base_model=BASE))
    check_base_model(rec, BASE)
    with pytest.raises(PlanError) as err:
        check_base_model(rec, "transformers:/models/Llama-1B:def456")
    assert "'fresh' was trained for base model" in str(err.value)
    assert BASE in str(err.value) and "Llama-1B" in str(err.value)
    with pytest.raises(PlanError, match="identity is unknown"):
        check_base_model(rec, None)
    with pytest.raises(ConfigError, match="base_model"):
        cat.new_record(stmt(), base_model="")


def test_drop_removes_record_and_weights(cat: AdapterCatalog, tmp_path: Path) -> None:
    rec = cat.create(cat.new_record(stmt(), base_model=BASE))
    Path(rec.path).mkdir()
    (Path(rec.path) / "adapter_model.safetensors").write_bytes(b"w" * 10)
    assert cat.drop("fresh") is True
    assert not cat.record_path("fresh").exists() and not Path(rec.path).exists()
    assert cat.names() == ()
    outside = tmp_path / "mine"
    outside.mkdir()
    cat.create(AdapterRecord.new(stmt(), base_model=BASE, path=outside))
    cat.drop("fresh")
    assert outside.is_dir(), "weights outside the catalog folder are the user's: kept"


def test_interrupted_training_is_marked_incomplete_and_resumes(cat: AdapterCatalog) -> None:
    cat.create(cat.new_record(stmt(), base_model=BASE))
    cat.update("fresh", loss_curve=[(1, 0.9), (2, 0.7)])
    cat.create(cat.new_record(stmt("done"), base_model=BASE))
    cat.update("done", status="ready")
    assert AdapterCatalog(cat.folder).recover() == ("fresh",)
    rec = cat.get("fresh")
    assert rec.status == "incomplete" and "run the same CREATE ADAPTER again" in rec.reason
    assert cat.get("done").status == "ready"
    with pytest.raises(PlanError, match="already exists \\(incomplete"):
        cat.create(cat.new_record(stmt(rank=4), base_model=BASE))
    with pytest.raises(PlanError, match="already exists"):
        cat.create(cat.new_record(stmt(), base_model=BASE), resume=False)
    resumed = cat.create(cat.new_record(stmt(), base_model=BASE))
    assert resumed.status == "training" and resumed.reason == ""
    assert resumed.loss_curve == ((1, 0.9), (2, 0.7)) and resumed.created == rec.created


def test_update_checks_its_fields(cat: AdapterCatalog) -> None:
    cat.create(cat.new_record(stmt(), base_model=BASE))
    with pytest.raises(ConfigError, match="cannot change 'base_model'"):
        cat.update("fresh", base_model="other")
    with pytest.raises(ConfigError, match="the statuses are " + ", ".join(STATUSES)):
        cat.update("fresh", status="done")
    failed = cat.update("fresh", status="failed", reason="the training set is empty")
    assert cat.get("fresh").reason == "the training set is empty" == failed.reason


def test_failed_rename_keeps_the_previous_record(cat: AdapterCatalog,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cat.create(cat.new_record(stmt(), base_model=BASE))
    cat.update("fresh", status="ready", loss_curve=[(1, 0.4)])
    before = cat.get("fresh")

    def full(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(ExecutionError) as err:
        cat.update("fresh", status="failed", reason="x")
    assert "No space left on device" in str(err.value) and "previous state is kept" in str(
        err.value)
    monkeypatch.undo()
    assert cat.get("fresh") == before
    assert leftovers(cat) == []


def test_failed_link_creates_nothing(cat: AdapterCatalog, monkeypatch: pytest.MonkeyPatch,
                                     ) -> None:
    cat.folder.mkdir(parents=True)

    def full(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", full)
    with pytest.raises(ExecutionError, match="could not write adapter 'fresh'"):
        cat.create(cat.new_record(stmt(), base_model=BASE))
    monkeypatch.undo()
    assert cat.names() == () and leftovers(cat) == []
    cat.create(cat.new_record(stmt(), base_model=BASE))
    assert cat.get("fresh").status == "training"


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE (POSIX)")
def test_disk_full_while_writing_leaves_no_half_written_record(cat: AdapterCatalog) -> None:
    """A real short write: the file size limit makes write() fail with EFBIG mid-record."""
    import resource

    cat.create(cat.new_record(stmt(), base_model=BASE))
    before = cat.record_path("fresh").read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256, hard))
    try:
        with pytest.raises(ExecutionError, match="could not write"):
            cat.update("fresh", status="ready", loss_curve=[(i, 0.5) for i in range(200)])
        with pytest.raises(ExecutionError, match="could not write"):
            cat.create(cat.new_record(stmt("other"), base_model=BASE))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    assert cat.record_path("fresh").read_bytes() == before
    assert cat.get("fresh").status == "training" and cat.names() == ("fresh",)
    assert leftovers(cat) == []


def test_a_crash_leftover_temp_file_is_ignored(cat: AdapterCatalog) -> None:
    cat.create(cat.new_record(stmt(), base_model=BASE))
    (cat.folder / ".fresh.json.abc123.tmp").write_text('{"format": 1, "name": "fre')
    assert cat.names() == ("fresh",) and cat.get("fresh").status == "training"


def test_corrupt_record_is_a_config_error_naming_the_file(cat: AdapterCatalog) -> None:
    cat.folder.mkdir(parents=True)
    cat.record_path("fresh").write_text('{"format": 1, "name": "fre')
    with pytest.raises(ConfigError) as err:
        cat.get("fresh")
    assert str(cat.record_path("fresh")) in str(err.value) and "delete the file" in str(err.value)
    cat.record_path("fresh").write_text(json.dumps({"format": 99}))
    with pytest.raises(ConfigError, match="unknown record format 99"):
        cat.list()


def test_bad_names_are_refused(cat: AdapterCatalog) -> None:
    for name in ("../escape", "a b", "", "x" * 65):
        bad = dataclasses.replace(stmt(), name=name)
        with pytest.raises(ConfigError, match="not allowed"):
            cat.create(cat.new_record(bad, base_model=BASE))
    assert not cat.folder.exists() or cat.names() == ()


def test_default_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "shop.duckdb"
    assert default_folder(str(db)) == tmp_path / "shop.duckdb.adapters"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_folder() == tmp_path / "data" / "llmsql" / "adapters"
    assert default_folder(":memory:") == default_folder(None)
