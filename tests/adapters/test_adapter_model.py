"""CREATE ADAPTER with the embedded SmolLM2 through DuckDB: training through the engine, then
queries with ``adapter => 'name'``; ASYNC training while queries run, Ctrl-C and resume, and
the quality a user sees (accuracy before and after on held-out rotten_tomatoes reviews).

The rows are read from ../shared/datasets (as tests/test_explain.py does); the reviews are not
redistributable, so no copy is kept in the project.
"""

from __future__ import annotations

import _thread
import errno
import os
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import llmsql
from llmsql.errors import ExecutionError, PlanError
from tests.conftest import DATASETS

REVIEWS = DATASETS / "rotten_tomatoes_flatiron" / "reviews.parquet"
INSTRUCTION = "Is this review positive (fresh)? Answer Yes or No."
CALL = f"LLM_FILTER('{INSTRUCTION}', review)"

pytestmark = pytest.mark.skipif(not REVIEWS.exists(), reason=f"{REVIEWS} is not there")


def short_reviews(n: int, offset: int = 0, max_chars: int = 90) -> pa.Table:
    """``n`` reviews of at most ``max_chars`` characters (smallest review_id first) with a
    boolean ``fresh`` label."""
    t = pq.read_table(REVIEWS, columns=["review_id", "review", "fresh"])
    t = t.filter(pc.less_equal(pc.utf8_length(t["review"]), max_chars))
    t = t.sort_by("review_id").slice(offset, n)
    return pa.table({"review_id": t["review_id"], "review": t["review"].cast(pa.string()),
                     "fresh": pc.equal(t["fresh"], "fresh")})


@pytest.fixture(scope="module")
def con(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("adapters")
    c = llmsql.connect(backend="transformers", progress=False, adapters=folder)
    c.register("train", short_reviews(16))
    c.register("test", short_reviews(8, offset=16))
    yield c
    c.close()


def test_create_then_query_with_the_adapter(con: llmsql.Session) -> None:
    out = con.sql(f"CREATE ADAPTER fresh FOR {CALL} USING LORA (rank => 4, lr => 1e-3, "
                  "batch_size => 8, holdout => 0) AS SELECT review, fresh FROM train").arrow()
    row = out.to_pylist()[0]
    assert (row["name"], row["status"], row["steps"]) == ("fresh", "ready", 2)
    rec = con.adapters()[0]
    assert rec.base_model == con._identity(None) and len(rec.loss_curve) == 2
    assert len(rec.digest) >= 16 and (Path(rec.path) / "adapter_config.json").exists()
    q = f"SELECT review_id, LLM_FILTER('{INSTRUCTION}', review, adapter => 'fresh') AS ok FROM test"
    first = con.sql(q)
    assert first.arrow().column("ok").null_count == 0
    assert first.stats.calls[0].sent == 8
    again = con.sql(q)  # the result cache answers it, under the adapter's key
    assert again.stats.calls[0].from_cache == 8
    assert again.arrow().column("ok").to_pylist() == first.arrow().column("ok").to_pylist()
    base = con.sql(f"SELECT LLM_FILTER('{INSTRUCTION}', review) AS ok FROM test")
    assert base.stats.calls[0].from_cache == 0  # not the adapter's answers
    # a second CREATE of the name changes nothing
    with pytest.raises(PlanError, match="already exists"):
        con.sql(f"CREATE ADAPTER fresh FOR {CALL} AS SELECT review, fresh FROM train")
    assert con.adapters()[0] == rec


def test_async_training_while_queries_run(con: llmsql.Session) -> None:
    out = con.sql(f"CREATE ADAPTER bg FOR {CALL} USING LORA (rank => 4, batch_size => 4, "
                  "holdout => 0) ASYNC AS SELECT review, fresh FROM train").arrow()
    assert out.column("status").to_pylist() == ["training"]
    q = f"SELECT LLM_FILTER('{INSTRUCTION}', review, adapter => 'bg') FROM test"
    with pytest.raises(PlanError, match="still training"):
        con.sql(q)
    plain = con.sql("SELECT LLM('Say hi.', review, max_tokens => 4) AS s FROM test")
    assert plain.arrow().num_rows == 8  # co-served with the training
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = {r.name: r for r in con.adapters()}["bg"]
        if status.status != "training":
            break
        time.sleep(1)
    assert status.status == "ready", status.reason
    assert con.sql(q).arrow().num_rows == 8


def test_ctrl_c_leaves_it_incomplete_and_a_rerun_resumes(con: llmsql.Session) -> None:
    sql = (f"CREATE ADAPTER cc FOR {CALL} USING LORA (rank => 4, batch_size => 2, "
           "holdout => 0) AS SELECT review, fresh FROM train")
    runs = con._adapters()

    def interrupt_after_first_step() -> None:
        while True:
            run = runs._runs.get("cc")
            if run is not None and run.handle is not None and run.handle.progress().step >= 1:
                _thread.interrupt_main()
                return
            time.sleep(0.05)

    threading.Thread(target=interrupt_after_first_step, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        con.sql(sql)
    rec = {r.name: r for r in con.adapters()}["cc"]
    assert rec.status == "incomplete" and "resume" in rec.reason
    with pytest.raises(PlanError, match="incomplete"):
        con.sql(f"SELECT LLM_FILTER('{INSTRUCTION}', review, adapter => 'cc') FROM test")
    with pytest.raises(PlanError, match="different definition"):
        con.sql(sql.replace("rank => 4", "rank => 8"))
    done = con.sql(sql).arrow().to_pylist()[0]
    assert done["status"] == "ready"
    metrics = {r.name: r for r in con.adapters()}["cc"].metrics
    assert dict(metrics)["resumed_from"] >= 1


def test_a_full_disk_at_create_leaves_nothing(con: llmsql.Session,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", full)  # the catalog links a new record into place
    with pytest.raises(ExecutionError, match="No space left"):
        con.sql(f"CREATE ADAPTER nospace FOR {CALL} USING LORA (holdout => 0) "
                "AS SELECT review, fresh FROM train")
    monkeypatch.undo()
    assert "nospace" not in {r.name for r in con.adapters()}
    assert not [p for p in con._adapters().catalog.folder.iterdir() if "nospace" in p.name]


@pytest.mark.slow
def test_quality_accuracy_rises_on_held_out_reviews(tmp_path: Path) -> None:
    """The issue's test: 2,000 labelled reviews, then 500 held-out ones; printed figures."""
    from bench.adapter_quality import run_experiment

    result = run_experiment(train_rows=2000, test_rows=500, adapters=tmp_path)
    print(f"\naccuracy on {result['test_rows']} held-out reviews: before "
          f"{result['accuracy_before']:.3f}, after {result['accuracy_after']:.3f} "
          f"(training {result['train_seconds']:.0f}s, CPU {result['cpu_seconds']:.0f}s)")
    assert result["accuracy_after"] - result["accuracy_before"] >= 0.15
