"""LoRA adapter files reach the Spark executors' inference workers (issue 16).

The driver reads an adapter's PEFT files into the task; each executor host writes them once
into its worker's private folder and sends requests with that local path. The Spark test
moves the driver's folder away before the job runs, so the executors can only answer from
the shipped copy, and checks their answers against the transformers backend used directly
with the same adapter.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmsql.backends.base import AdapterRef, BackendSpec, Request
from llmsql.errors import ConfigError, PlanError
from llmsql.executors.spark.adapters import (
    ShippedAdapter,
    local_copies,
    local_refs,
    ship_adapters,
)
from tests.executors.spark_fixtures import spark_session


def _fake_adapter(folder: Path, payload: bytes = b"weights") -> AdapterRef:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(payload)
    (folder / "README.md").write_text("not shipped")
    return AdapterRef(folder.name, str(folder), f"digest-{folder.name}")


def test_shipped_adapter_is_written_once_per_host(tmp_path: Path) -> None:
    ref = _fake_adapter(tmp_path / "driver" / "fresh")
    (shipped,) = ship_adapters([ref, None])  # None: a call on the base model
    assert [name for name, _ in shipped.files] == ["adapter_config.json",
                                                   "adapter_model.safetensors"]
    root = tmp_path / "executor"
    root.mkdir()
    paths = local_copies([shipped], root)
    local = Path(paths[ref.digest])
    assert local.parent == root and local != Path(ref.path)
    assert (local / "adapter_model.safetensors").read_bytes() == b"weights"
    assert local_copies([shipped], root) == paths  # the same copy, not a second one
    assert [p.name for p in root.iterdir()] == [local.name]  # no temporary folder left

    # other weights under the same digest never reuse the copy
    changed = ShippedAdapter(ref, (("adapter_config.json", b"{}"),
                                   ("adapter_model.safetensors", b"other")))
    assert local_copies([changed], root)[ref.digest] != str(local)

    # the step gets the adapter under its name, pointing at the copy
    assert local_refs([shipped], root) == {"fresh": dataclasses.replace(ref, path=str(local))}


def test_an_unreadable_adapter_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="has no adapter_config.json"):
        ship_adapters([AdapterRef("gone", str(tmp_path / "gone"), "d")])


# ---- Spark local[2], the real model ------------------------------------------------------------

SPEC = BackendSpec.make("transformers", None, threads=1, idle_timeout=120)
"""The spec of a session with the Spark tests' MODEL options: the tests share one worker
per executor."""
PROMPTS = ("Is the review positive? Review: A warm, funny film with a great cast.",
           "Is the review positive? Review: Dull, slow and far too long.",
           "Name a color.", "Count: 1 2 3")


def _requests(adapter: AdapterRef | None) -> list[Request]:
    return [Request(p, max_tokens=5, adapter=adapter) for p in PROMPTS]


def _answer_on_executor(shipped: tuple[ShippedAdapter, ...], name: str,
                        part: Iterator[Any]) -> Iterator[tuple[int, str, str]]:
    """An executor's half, as llmsql's Spark tasks do it: the step's adapters from this
    host's copies of the shipped files, then the executor's worker."""
    from llmsql.executors.spark.worker import task_adapters, worker_backend

    rows = list(part)
    if not rows:
        return
    adapter = task_adapters(shipped)[name]  # what StepEnv.adapters holds on the executor
    backend = worker_backend(SPEC)
    reqs = [Request(PROMPTS[r.i], max_tokens=5, adapter=adapter if r.lora else None)
            for r in rows]
    for r, resp in zip(rows, backend.generate(reqs), strict=True):
        yield r.i * 2 + int(r.lora), resp.text, resp.error or ""


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    with spark_session("local[2]") as s:
        yield s


@pytest.mark.spark
@pytest.mark.model
def test_executors_answer_with_the_shipped_adapter(spark: Any, tmp_path: Path) -> None:
    pytest.importorskip("peft", reason="peft is not installed")
    from llmsql.backends import get_backend
    from tests.backends.lora_helpers import make_adapters, one_thread

    with one_thread():
        (made,) = make_adapters(tmp_path / "catalog", ("fresh",), scale=0.1)
    direct = get_backend(SPEC)
    try:
        if not direct.capabilities.adapters:
            pytest.fail("the transformers backend does not serve adapters yet")
        base = [r.text for r in direct.generate(_requests(None))]
        expected = [r.text for r in direct.generate(_requests(made))]
    finally:
        direct.close()
    assert expected != base  # the adapter changes answers, so the check below can fail

    shipped = ship_adapters([made])
    hidden = tmp_path / "elsewhere"
    shutil.move(made.path, hidden)  # the executors cannot read the driver's folder now
    rows = [(i, lora) for i in range(len(PROMPTS)) for lora in (False, True)]
    df = spark.createDataFrame(rows, "i INT, lora BOOLEAN").repartition(2)
    out = df.rdd.mapPartitions(
        lambda part: _answer_on_executor(shipped, made.name, part)).collect()
    got = {k: (text, err) for k, text, err in out}
    assert all(err == "" for _, err in got.values()), got
    assert [got[2 * i + 1][0] for i in range(len(PROMPTS))] == expected
    assert [got[2 * i][0] for i in range(len(PROMPTS))] == base


MAP_SQL = ("SELECT id, LLM('In three words, what does the review say?', review, max_tokens => 4"
           "{adapter}) AS s FROM reviews")


def _register(con: Any, folder: Path) -> AdapterRef:
    """Put a real PEFT adapter into the session's catalog as a ready adapter named fresh."""
    import hashlib

    from llmsql.adapters import AdapterCatalog, parse_adapter_statement
    from llmsql.cache import model_key
    from tests.backends.lora_helpers import make_adapters, one_thread

    catalog = AdapterCatalog(folder)
    stmt = parse_adapter_statement(
        "CREATE ADAPTER fresh FOR LLM('In three words, what does the review say?', review) "
        "AS SELECT review, stars AS label FROM reviews")
    record = catalog.create(catalog.new_record(stmt, base_model=model_key(con.spec(None))))
    with one_thread():
        (made,) = make_adapters(Path(record.path).parent, (Path(record.path).name,))
    weights = Path(made.path) / "adapter_model.safetensors"
    catalog.update("fresh", status="ready", digest=hashlib.sha256(weights.read_bytes()).hexdigest())
    return made


@pytest.mark.spark
@pytest.mark.model
def test_sql_with_an_adapter_on_spark_answers_as_duckdb(spark: Any, tmp_path: Path) -> None:
    """``adapter => 'fresh'`` through the Spark engine: the tasks carry the adapter to the
    executors' workers, whose answers are DuckDB's (the same backend, in-process)."""
    pytest.importorskip("peft", reason="peft is not installed")
    import llmsql
    from tests.executors.spark_fixtures import MODEL, multiset, with_tables

    opts = {**MODEL, "adapters": str(tmp_path / "adapters")}
    duck = with_tables(llmsql.connect(**opts))
    sp = with_tables(llmsql.connect(**opts, engine="spark", spark=spark))
    try:
        assert sp.spec(None) == SPEC
        _register(duck, tmp_path / "adapters")
        with_adapter = MAP_SQL.format(adapter=", adapter => 'fresh'")
        expected = duck.sql(with_adapter).arrow()
        assert multiset(expected) != multiset(duck.sql(MAP_SQL.format(adapter="")).arrow())
        assert multiset(sp.sql(with_adapter).arrow()) == multiset(expected)
    finally:
        duck.close()
        sp.close()


@pytest.mark.spark
@pytest.mark.model
def test_column_functions_answer_with_a_catalog_adapter(spark: Any, tmp_path: Path) -> None:
    """``llm(..., adapter='fresh', adapters=folder)`` on a Spark DataFrame answers as the
    SQL call with ``adapter => 'fresh'`` does on DuckDB; an unknown name is a PlanError."""
    pytest.importorskip("peft", reason="peft is not installed")
    import llmsql
    from llmsql.spark_columns import llm
    from tests.executors.spark_fixtures import MODEL, multiset, with_tables

    folder = tmp_path / "adapters"
    duck = with_tables(llmsql.connect(**MODEL, adapters=str(folder)))
    try:
        _register(duck, folder)
        expected = duck.sql(MAP_SQL.format(adapter=", adapter => 'fresh'")).arrow()
        rows = duck.sql("SELECT id, review FROM reviews").arrow().to_pylist()
    finally:
        duck.close()
    df = spark.createDataFrame([(r["id"], r["review"]) for r in rows], "id INT, review STRING")
    col = llm("In three words, what does the review say?", "review", max_tokens=4,
              adapter="fresh", adapters=folder, backend=SPEC)
    got = df.select("id", col.alias("s")).toArrow()
    assert multiset(got) == multiset(expected)
    with pytest.raises(PlanError, match="unknown|no adapter"):
        llm("Say.", "review", adapter="nope", adapters=folder, backend=SPEC)
