#!/usr/bin/env python3
"""Prefix-affinity partitioning vs Spark's default partitioning on W1, with executor workers.

Runs W1 (../shared/bench/WORKLOADS.md: movies filter, fields synopsis, genre, director,
review) on ``local-cluster[2,1,2048]`` -- two executors with one core each, each hosting one
llmsql inference worker with the embedded SmolLM2-135M model (transformers backend, CPU) --
twice in one Spark application (W1's filter selected as a column, so the answers of the
two variants can be compared; the prompts are W1's):

- ``default``: the call's distinct inputs spread round-robin over the partitions
  (``spark.llmsql.partitioning=default``), each partition still ordered by the optimizer;
- ``affinity``: prefix groups (same leading field value) kept in one partition, partitions
  balanced by estimated tokens.

Both variants use the same SparkSession, so the same two workers (the model is loaded once
per executor, during a warm-up query that is not timed). Reported per variant: wall time of
the query, prompt and cached tokens as the workers count them (deltas of their counters),
the prefix-cache hit rate, and how many filter answers agree between the variants.

The transformers backend reuses a prefix only inside one batch handed to it (a prompt that
shares its prefix with a prompt of another batch is computed again): the hit rate is what
the workers measured under that rule, not what vLLM's cross-batch cache would give.

The slice: W1's 15,000 rows, then whole movies in ``numpy.random.default_rng(0)`` order of
their movie_id, while the total stays within ``--rows`` (default 320), so the size
distribution of the prefix groups is W1's.

The variants run one after the other (default first) on a machine that may be shared: wall
times are indicative; token counts are exact.

Usage: python bench/spark_affinity.py [--rows N] [--partitions N] [--out DIR]
Writes DIR/spark_affinity.json and DIR/spark_affinity.md (DIR defaults to bench/results).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import llmsql

SHARED = Path(os.environ.get("LLMSQL_SHARED", REPO.parent / "shared"))
TABLE = SHARED / "datasets" / "rotten_tomatoes_flatiron" / "movie_reviews.parquet"
W1_ROWS = 15_000
QUESTION = ("Given the movie information and a critic review, does the review recommend "
            "watching the movie? Answer Yes or No.")
W1 = (f"SELECT review_id, LLM_FILTER('{QUESTION}', synopsis, genre, director, review) AS ok "
      "FROM movie_reviews")
FIELDS = ("review_id", "movie_id", "synopsis", "genre", "director", "review")


def w1_slice(rows: int) -> pa.Table:
    """W1's rows of whole movies (seeded order) up to ``rows`` rows."""
    table = pq.read_table(TABLE, columns=list(FIELDS))
    table = table.take(pc.sort_indices(table, [("review_id", "ascending")])[:W1_ROWS])
    movies = np.unique(table.column("movie_id").to_numpy())
    keep: list[int] = []
    total = 0
    counts = dict(zip(*np.unique(table.column("movie_id").to_numpy(), return_counts=True),
                      strict=True))
    for m in np.random.default_rng(0).permutation(movies):
        if total + counts[m] <= rows:
            keep.append(int(m))
            total += int(counts[m])
    mask = pc.is_in(table.column("movie_id"), pa.array(keep, type=pa.int64()))
    return table.filter(mask).drop_columns(["movie_id"])


def spark_session(master: str, partitions: int) -> Any:
    from pyspark.sql import SparkSession

    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    spark = (SparkSession.builder.master(master).appName("llmsql-bench-affinity")
             .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
             .config("spark.executorEnv.PYTHONPATH", path)
             .config("spark.llmsql.partitions", str(partitions)).getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def worker_totals(con: llmsql.Session) -> dict[int, dict[str, int]]:
    """The latest cumulative counters of every worker seen so far, by worker pid."""
    out: dict[int, dict[str, int]] = {}
    for r in con.executor.reports:  # type: ignore[attr-defined]
        out[r.worker_pid] = {k: int(v) for k, v in r.worker.items()
                             if k in ("prompt_tokens", "cached_tokens", "requests",
                                      "engine_batches", "model_loads")}
    return out


def delta(after: dict[int, dict[str, int]], before: dict[int, dict[str, int]]) -> dict[str, int]:
    keys = ("prompt_tokens", "cached_tokens", "requests", "engine_batches")
    return {k: sum(a[k] - before.get(pid, {}).get(k, 0) for pid, a in after.items())
            for k in keys}


def run_variant(spark: Any, table: pa.Table, mode: str, base: llmsql.Session) -> dict[str, Any]:
    spark.conf.set("spark.llmsql.partitioning", mode)
    con = llmsql.connect(backend="transformers", engine="spark", spark=spark, threads=1,
                         idle_timeout=600, cache=False, progress=False)
    con.register("movie_reviews", table)
    con.executor.reports = base.executor.reports  # type: ignore[attr-defined]
    before = worker_totals(con)
    start = time.perf_counter()
    result = con.sql(W1)
    wall = time.perf_counter() - start
    used = delta(worker_totals(con), before)
    call = result.stats.calls[-1]
    answers = dict(zip(result.arrow().column("review_id").to_pylist(),
                       result.arrow().column("ok").to_pylist(), strict=True))
    reports = [r for r in con.executor.reports if r.call_id == call.call_id]  # type: ignore[attr-defined]
    return {
        "mode": mode,
        "wall_s": round(wall, 2),
        "generate_s": round(call.generate_seconds, 2),
        "worker_prompt_tokens": used["prompt_tokens"],
        "worker_cached_tokens": used["cached_tokens"],
        "worker_hit_rate": round(used["cached_tokens"] / max(1, used["prompt_tokens"]), 4),
        "worker_requests": used["requests"],
        "worker_engine_batches": used["engine_batches"],
        "call_cached_tokens": call.cached_tokens,
        "partitions": sorted(({"partition": r.partition, "executor": r.executor,
                               "rows": r.rows, "prompt_tokens": r.prompt_tokens,
                               "cached_tokens": r.cached_tokens} for r in reports),
                             key=lambda p: p["partition"]),
        "layout": [n for n in call.notes if "partition" in n or n.startswith("split")],
        "_answers": answers,
    }


def machine(spark: Any) -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    import pyspark
    import torch
    import transformers

    mem = next((int(line.split()[1]) // 1024 for line in
                Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")), 0)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_mb": mem,
            "python": platform.python_version(), "pyspark": pyspark.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "master": spark.sparkContext.master, "load_average": os.getloadavg()}


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Spark: prefix-affinity vs default partitioning (W1 slice)",
        "",
        (f"Run {report['date']} with `python bench/spark_affinity.py --rows {report['rows_max']} "
        f"--partitions {report['partitions']}`."),
        "",
        (f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_mb']:,} MB; Python {m['python']}, "
        f"pyspark {m['pyspark']}, torch {m['torch']}, transformers {m['transformers']}; "
        f"master `{m['master']}` (2 executors x 1 core, one llmsql transformers worker each, "
        f"SmolLM2-135M-Instruct on the CPU, 1 thread). Load average at start "
        f"{report['load_start'][0]:.1f}, at end {m['load_average'][0]:.1f} (a shared machine: "
        "wall times are noisy; token counts are exact)."),
        "",
        (f"Slice: {report['rows']} rows of W1 = {report['movies']} whole movies "
        f"(prefix groups of {report['group_min']}..{report['group_max']} rows), "
        f"{report['partitions']} partitions per call. The query is W1's LLM_FILTER with its "
        "answer selected (`SELECT review_id, LLM_FILTER(...) AS ok`) rather than in WHERE, so "
        "that the two variants' answers can be compared row by row; the prompts are W1's."),
        "",
        ("| partitioning | wall s | generate s | prompt tokens | cached tokens | hit rate "
        "| engine batches |"),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v in report["variants"]:
        lines.append(f"| {v['mode']} | {v['wall_s']:.1f} | {v['generate_s']:.1f} | "
                     f"{v['worker_prompt_tokens']:,} | {v['worker_cached_tokens']:,} | "
                     f"{100 * v['worker_hit_rate']:.1f}% | {v['worker_engine_batches']} |")
    lines += [
        "",
        ("Tokens and hits are the workers' own counters (deltas over the query). The "
        "transformers backend reuses a shared prefix only inside one batch handed to it, so "
        "a hit is a prompt whose prefix KV was computed once for its batch. Answers agreeing "
        f"between the two variants: {report['agreement']:.1%} (the optimizer may choose a "
        "different field order for a row when its partition holds other rows)."),
        "",
        "Per partition (rows, prompt tokens, cached tokens):",
        "",
    ]
    for v in report["variants"]:
        parts = ", ".join(f"p{p['partition']}: {p['rows']}/{p['prompt_tokens']:,}/"
                          f"{p['cached_tokens']:,}" for p in v["partitions"])
        lines.append(f"- {v['mode']}: {parts}")
        lines += [f"  - {note}" for note in v["layout"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=320, help="at most this many W1 rows")
    ap.add_argument("--partitions", type=int, default=4, help="partitions per LLM call")
    ap.add_argument("--master", default="local-cluster[2,1,2048]")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    load_start = os.getloadavg()
    table = w1_slice(args.rows)
    spark = spark_session(args.master, args.partitions)
    warm = llmsql.connect(backend="transformers", engine="spark", spark=spark, threads=1,
                          idle_timeout=600, cache=False, progress=False)
    warm.register("movie_reviews", table.slice(0, 40))
    warm.sql(W1)  # starts both executors' workers (model load) outside the timings
    variants = [run_variant(spark, table, mode, warm) for mode in ("default", "affinity")]
    a, b = (v.pop("_answers") for v in variants)
    sizes = np.unique(pq.read_table(TABLE, columns=["review_id", "movie_id"]).filter(
        pc.is_in(pc.field("review_id"), table.column("review_id"))).column("movie_id")
        .to_numpy(), return_counts=True)[1]
    report = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "workload": "W1", "sql": W1, "rows_max": args.rows, "rows": table.num_rows,
        "movies": len(sizes), "group_min": int(sizes.min()), "group_max": int(sizes.max()),
        "partitions": args.partitions, "load_start": load_start,
        "agreement": sum(a[k] == b.get(k) for k in a) / max(1, len(a)),
        "variants": variants, "machine": machine(spark),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "spark_affinity.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "spark_affinity.md").write_text(markdown(report))
    print(markdown(report))
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
