#!/usr/bin/env python3
"""The quality a user sees from ``CREATE ADAPTER`` (issue 16): accuracy before and after.

With the embedded SmolLM2 (``transformers`` backend, CPU), an LLM_FILTER asks whether a
rotten_tomatoes_flatiron critic review is positive (``fresh``). The reviews of at most
``--max-chars`` characters are taken in ``review_id`` order: the first ``--train`` are the
training rows (``CREATE ADAPTER ... AS SELECT review, fresh FROM train``), the next ``--test``
the held-out rows. The same query runs on the held-out rows without and with
``adapter => 'fresh'``; accuracy is the share of rows whose answer equals the label (a NULL
answer counts as wrong). Also recorded: training wall time, the process's CPU time for the
CREATE (all threads), steps, tokens, the loss curve's first and last values, the machine.

Usage: python bench/adapter_quality.py [--train 2000] [--test 500] [--quick] [--out DIR]
(``--quick``: 200 / 100 rows). Writes DIR/adapter_quality.json and .md (DIR: bench/results).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import machine  # noqa: E402

DATASETS = Path(os.environ.get("LLMSQL_SHARED", REPO.parent / "shared")) / "datasets"
REVIEWS = DATASETS / "rotten_tomatoes_flatiron" / "reviews.parquet"
INSTRUCTION = "Is this review positive (fresh)? Answer Yes or No."
LORA = {"rank": 8, "alpha": 16, "lr": 1e-3, "epochs": 1, "batch_size": 8}


def reviews(train_rows: int, test_rows: int, max_chars: int, path: Path = REVIEWS) -> tuple[
        Any, Any]:
    """The training and held-out tables (review_id, review, fresh BOOLEAN)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["review_id", "review", "fresh"])
    t = t.filter(pc.less_equal(pc.utf8_length(t["review"]), max_chars)).sort_by("review_id")
    t = pa.table({"review_id": t["review_id"], "review": t["review"].cast(pa.string()),
                  "fresh": pc.equal(t["fresh"], "fresh")})
    return t.slice(0, train_rows), t.slice(train_rows, test_rows)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _accuracy(con: Any, adapter: str | None) -> float:
    option = f", adapter => '{adapter}'" if adapter else ""
    t = con.sql(f"SELECT fresh, LLM_FILTER('{INSTRUCTION}', review{option}) AS ok "
                "FROM test").arrow()
    got, want = t.column("ok").to_pylist(), t.column("fresh").to_pylist()
    return sum(g is not None and g == w for g, w in zip(got, want, strict=True)) / len(want)


def run_experiment(*, train_rows: int = 2000, test_rows: int = 500, max_chars: int = 120,
                   adapters: str | Path | None = None, progress: bool = False,
                   lora: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train on ``train_rows`` reviews, measure on the next ``test_rows``; the figures."""
    import llmsql

    train, test = reviews(train_rows, test_rows, max_chars)
    folder = adapters or tempfile.mkdtemp(prefix="llmsql-adapters-")
    options = {**LORA, **(lora or {}), "holdout": 0}
    using = ", ".join(f"{k} => {v!r}" for k, v in options.items())
    con = llmsql.connect(backend="transformers", cache=False, progress=progress,
                         adapters=folder)
    try:
        con.register("train", train)
        con.register("test", test)
        before = _accuracy(con, None)
        wall, cpu = time.perf_counter(), _cpu()
        con.sql(f"CREATE ADAPTER fresh FOR LLM_FILTER('{INSTRUCTION}', review) USING LORA "
                f"({using}) AS SELECT review, fresh FROM train")
        wall, cpu = time.perf_counter() - wall, _cpu() - cpu
        after = _accuracy(con, "fresh")
        rec = con.adapters()[0]
    finally:
        con.close()
    metrics = dict(rec.metrics)
    return {"train_rows": train.num_rows, "test_rows": test.num_rows, "max_chars": max_chars,
            "positive_share_test": sum(test.column("fresh").to_pylist()) / test.num_rows,
            "accuracy_before": before, "accuracy_after": after,
            "train_seconds": wall, "cpu_seconds": cpu, "steps": int(metrics["steps"]),
            "train_tokens": int(metrics["train_tokens"]), "lora": options,
            "loss_first": rec.loss_curve[0][1] if rec.loss_curve else None,
            "loss_last": rec.loss_curve[-1][1] if rec.loss_curve else None}


def _markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    return "\n".join([
        "# CREATE ADAPTER quality: SmolLM2-135M, LLM_FILTER on rotten_tomatoes reviews", "",
        f"Instruction: `{INSTRUCTION}`; reviews of at most {r['max_chars']} characters in "
        f"review_id order: {r['train_rows']} training rows, the next {r['test_rows']} held "
        f"out ({r['positive_share_test']:.1%} of them fresh). LoRA: {r['lora']}.", "",
        "| | accuracy on held-out rows |", "|---|---|",
        f"| base model | {r['accuracy_before']:.3f} |",
        f"| with the adapter | {r['accuracy_after']:.3f} |", "",
        f"Training: {r['steps']} steps, {r['train_tokens']:,} tokens, {r['train_seconds']:.0f} "
        f"s wall, {r['cpu_seconds']:.0f} s CPU (all threads); loss {r['loss_first']:.3f} -> "
        f"{r['loss_last']:.3f}.", "",
        f"Machine: {m['cpu']}, {m['cores_usable']} usable cores, load average "
        f"{m['load_average']} at the end, Python {m['python']}, {m['date']}.", ""])


def main(argv: list[str] | None = None) -> int:
    """Run the experiment and write the JSON and Markdown results."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--max-chars", type=int, default=120)
    ap.add_argument("--quick", action="store_true", help="200 training rows, 100 held out")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    train, test = (200, 100) if args.quick else (args.train, args.test)
    result = run_experiment(train_rows=train, test_rows=test, max_chars=args.max_chars,
                            progress=True)
    import torch

    result["machine"] = machine(torch=torch.__version__, llmsql=_version())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adapter_quality.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "adapter_quality.md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


def _version() -> str:
    import llmsql

    return llmsql.__version__


if __name__ == "__main__":
    sys.exit(main())
