#!/usr/bin/env python3
"""Prefix reuse and solver time of the field/row ordering (issue 3, rule 3) on W1-W4.

For each workload of ../shared/bench/WORKLOADS.md, and for each method (table order, shuffled
with seed 0, GGR, llmsql), render the prompts with the default rendering contract, score them
with ../shared/bench/prefix_score.py (lru with 64-char blocks at 4096 and 1024 blocks, and
prev_lcp), and time the solver. Also reports the repetition bound, two extra tables whose
repeated values cut across groups (not part of WORKLOADS.md; marked as extra), and a scale test
(full ratebeer and a 1M-row table, W2's fields; solver time only).

Usage: python bench/prefix_reuse.py [--datasets PATH] [--scorer PATH] [--out DIR] [--quick]
Writes DIR/prefix_reuse.json and DIR/prefix_reuse.md (DIR defaults to bench/results).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import ggr
from bench.machine import machine as describe_machine
from llmsql.optimizer import ordering

MOVIES_Q = ("Given the movie information and a critic review, does the review recommend "
            "watching the movie? Answer Yes or No.")


@dataclass(frozen=True)
class Workload:
    """One benchmark table: which rows, which fields, which instruction."""

    wid: str
    title: str
    path: str  # relative to the datasets folder
    fields: tuple[str, ...]
    instruction: str
    key: str | None = None  # take the `limit` rows with the smallest key, in key order
    limit: int | None = None
    extra: bool = False  # not in WORKLOADS.md


WORKLOADS = (
    Workload("W1", "movies filter", "rotten_tomatoes_flatiron/movie_reviews.parquet",
             ("synopsis", "genre", "director", "review"), MOVIES_Q, "review_id", 15_000),
    Workload("W2", "beer filter", "ratebeer_reviews/beer_reviews.parquet",
             ("beer_name", "style", "brewery", "location", "review"),
             "Does the reviewer recommend this beer? Answer Yes or No.", "review_id", 28_479),
    Workload("W3", "squad RAG", "squad_v1_1_dev/squad_dev.parquet",
             ("title", "context", "question"),
             "Answer the question using only the context. Answer with a short phrase."),
    Workload("W4", "paper movies", "llmsql_paper_movies_sample/movies_small.parquet",
             ("movie_title", "movie_info", "review_content"), MOVIES_Q),
    Workload("X1", "climate claim+evidence (extra)", "climate_fever/claim_evidence.parquet",
             ("claim", "evidence"),
             "Does the evidence support the claim? Answer SUPPORTS, REFUTES or NOT_ENOUGH_INFO.",
             extra=True),
    Workload("X2", "gift card reviews (extra)", "amazon_gift_cards_2018/product_reviews.parquet",
             ("title", "description", "reviewer_id", "summary", "review_text"),
             "Summarize what the reviewer thinks of the product.", extra=True),
)


def fmt_value(v: Any) -> str:
    """The WORKLOADS.md value contract: strings verbatim, ints decimal, floats repr, NULL ''."""
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    if isinstance(v, (dt.date, dt.datetime, pd.Timestamp)):
        return v.isoformat()
    return str(v)


def load(w: Workload, datasets: Path) -> list[list[str]]:
    """The workload's columns, as rendered strings, in table order."""
    df = pd.read_parquet(datasets / w.path)
    if w.key is not None:
        df = df.sort_values(w.key, kind="stable")
        if w.limit is not None:
            df = df.head(w.limit)
    return [[fmt_value(v) for v in df[f].tolist()] for f in w.fields]


def load_scorer(path: Path) -> Callable[..., dict[str, Any]]:
    spec = importlib.util.spec_from_file_location("prefix_score", path)
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.score  # type: ignore[no-any-return]


def shuffled(n: int, m: int) -> ordering.Ordering:
    rows = np.random.default_rng(0).permutation(n)
    return ordering.Ordering(tuple(rows.tolist()), (tuple(range(m)),), (0,) * n)


@dataclass(frozen=True)
class Timing:
    """Best wall time and best CPU time (this process) over the repeats, in seconds."""

    wall: float
    cpu: float


def timed(fn: Callable[[], ordering.Ordering], repeat: int) -> tuple[ordering.Ordering, Timing]:
    """Run ``fn`` ``repeat`` times; return its result and its best wall and CPU times."""
    wall = cpu = math.inf
    out = None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall = min(wall, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    assert out is not None
    return out, Timing(wall, cpu)


Runs = dict[str, tuple[ordering.Ordering, Timing | None]]


def methods(w: Workload, cols: list[list[str]], repeat: int) -> Runs:
    """Every method's ordering of one workload, with its solver time (None: no solver)."""
    n, m = len(cols[0]), len(cols)
    names = list(w.fields)
    out: Runs = {
        "table order": (ordering.Ordering.table_order(n, m), None),
        "shuffled": (shuffled(n, m), None),
    }
    # GGR as the artifact runs it by default (2,000-row parts), and as one part (the table
    # of issue 3 matches this variant on W2).
    out["GGR"] = timed(lambda: ggr.ggr(cols, names), 1)
    out["GGR (one part)"] = timed(lambda: ggr.ggr(cols, names, chunk_rows=len(cols[0])), 1)
    out["llmsql"] = timed(lambda: ordering.solve(cols, names, instruction=w.instruction), repeat)
    return out


def item_ceiling(cols: list[list[str]], names: Sequence[str], instruction: str) -> float:
    """An upper bound on the item-level reuse any ordering reaches (partial matches of
    lines not counted), with one prompt prefix per row.

    In a prefix tree a node of ``size`` rows on items S saves ``weight x (size - 1)``, i.e.
    ``weight x (size - 1) / size`` per member, and ``size`` is at most c(S), the rows
    holding all of S. So a row gains at most the best chain of its own items, found by a
    dynamic program over subsets of its fields: best(S) = max over j in S of
    best(S - j) + weight_j x (c(S) - 1) / c(S). Only for up to 10 fields.
    """
    n, m = len(cols[0]), len(cols)
    if m > 10:
        return float("nan")
    codes = [pd.factorize(pd.Series(c, dtype=object))[0].astype(np.int64) for c in cols]
    weight = np.array([[len(nm) + 3 + len(v) for v in c] for nm, c in zip(names, cols, strict=False)]).T
    best = {0: np.zeros(n)}
    for subset in range(1, 1 << m):
        members = [j for j in range(m) if subset >> j & 1]
        key = np.zeros(n, dtype=np.int64)
        for j in members:
            key = pd.factorize(key * (int(codes[j].max()) + 1) + codes[j])[0].astype(np.int64)
        count = np.bincount(key)[key]
        gain = (count - 1) / count
        best[subset] = np.max([best[subset & ~(1 << j)] + weight[:, j] * gain for j in members],
                              axis=0)
    head = len(instruction) + 1
    total = head * n + weight.sum()
    return float((head * (n - 1) + best[(1 << m) - 1].sum()) / total)


def score_job(args: tuple[str, list[str]]) -> dict[str, float]:
    scorer_path, prompts = args
    score = load_scorer(Path(scorer_path))
    big, small = score(prompts, block=64, capacity=4096), score(prompts, block=64, capacity=1024)
    return {"lru@4096": big["lru"], "lru@1024": small["lru"], "prev_lcp": big["prev_lcp"],
            "trie": big["trie"]}


def bench_workloads(datasets: Path, scorer: Path, repeat: int, jobs: int,
                    only: Sequence[str]) -> list[dict[str, Any]]:
    results = []
    for w in WORKLOADS:
        if only and w.wid not in only:
            continue
        cols = load(w, datasets)
        names = list(w.fields)
        bound = ordering.repetition_bound(cols, names, instruction=w.instruction)
        ceiling = item_ceiling(cols, names, w.instruction)
        runs = methods(w, cols, repeat)
        prompts = {k: ordering.render(w.instruction, names, cols, o) for k, (o, _) in runs.items()}
        check_same_multiset(prompts)
        with ProcessPoolExecutor(jobs) as pool:
            scores = list(pool.map(score_job, [(str(scorer), p) for p in prompts.values()]))
        row = {"id": w.wid, "title": w.title, "rows": len(cols[0]), "fields": names,
               "extra": w.extra, "repetition_bound": round(bound, 4),
               "item_ceiling": round(ceiling, 4), "methods": {}}
        for (k, (o, t)), s in zip(runs.items(), scores, strict=True):
            row["methods"][k] = {**s, "field_orders": len(o.field_orders),
                                 "solver_wall_s": None if t is None else round(t.wall, 4),
                                 "solver_cpu_s": None if t is None else round(t.cpu, 4)}
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def check_same_multiset(prompts: dict[str, list[str]]) -> None:
    """Every method must send the same multiset of (row -> field lines), only reordered."""
    ref = None
    for k, ps in prompts.items():
        got = sorted("".join(sorted(p.splitlines(keepends=True))) for p in ps)
        if ref is None:
            ref = got
        elif got != ref:
            raise AssertionError(f"{k}: prompts are not a reordering of the table's prompts")


def scale_table(datasets: Path, rows: int) -> pa.Table:
    """Full ratebeer with W2's fields, repeated (with fresh review ids) up to ``rows`` rows."""
    w = WORKLOADS[1]
    table = pq.read_table(datasets / w.path, columns=["review_id", *w.fields])
    copies = pa.concat_tables([table] * math.ceil(rows / table.num_rows)).slice(0, rows)
    fresh = pa.array(np.arange(copies.num_rows, dtype=np.int64))
    return copies.set_column(0, "review_id", fresh)  # not a prompt field


def bench_scale(datasets: Path, repeat: int) -> list[dict[str, Any]]:
    """Solver time on the full ratebeer table and on 1M rows, from Arrow and from lists."""
    w = WORKLOADS[1]
    names = list(w.fields)
    out = []
    for label, rows in (("ratebeer full", 189_249), ("ratebeer repeated to 1M, fresh ids",
                                                      1_000_000)):
        table = scale_table(datasets, rows)
        arrow = [table.column(f) for f in names]
        lists = [c.to_pylist() for c in arrow]
        for kind, cols in (("Arrow arrays", arrow), ("Python lists", lists)):
            _, t = timed(lambda c=cols: ordering.solve(c, names, instruction=w.instruction),
                         repeat)
            row = {"table": label, "rows": table.num_rows, "fields": names, "input": kind,
                   "solver_wall_s": round(t.wall, 3), "solver_cpu_s": round(t.cpu, 3)}
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


def _secs(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown(meta: dict[str, Any], results: list[dict[str, Any]],
             scale: list[dict[str, Any]]) -> str:
    """The results as a Markdown report."""
    load = ", ".join(f"{x:.1f}" for x in meta["load_average"])
    busy = ("" if meta["load_average"][0] < meta["cores"] else
            ": other jobs shared the machine, so wall times are inflated; CPU time counts this "
            "process only")
    lines = [
        "# Prefix reuse of field/row ordering (issue 3, rule 3)",
        "",
        (f"Machine: {meta['cpu']}, {meta['cores']} cores (load average {load} at the start"
        f"{busy}). Python {meta['python']}, numpy {meta['numpy']}, pandas {meta['pandas']}; "
        f"{meta['date']}. Produced by `python bench/prefix_reuse.py`."),
        "",
        ("Scores from ../shared/bench/prefix_score.py (characters reused / total): lru with 64-char "
        "blocks and 4096 or 1024 blocks of capacity, and prev_lcp. Solver times: llmsql best of "
        "the repeats, GGR one run (bench/ggr.py; \"one part\" skips the artifact's split "
        "into 2,000-row parts). X1/X2 are extra tables, not in WORKLOADS.md, whose repeated values "
        "cut across groups."),
        "",
        ("| workload | rows | method | lru@4096 | lru@1024 | prev_lcp | solver wall s | solver CPU s "
        "| field orders |"),
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for k, s in r["methods"].items():
            lines.append(
                f"| {r['id']} {r['title']} | {r['rows']:,} | {k} | {s['lru@4096']:.4f} | "
                f"{s['lru@1024']:.4f} | {s['prev_lcp']:.4f} | {_secs(s['solver_wall_s'])} | "
                f"{_secs(s['solver_cpu_s'])} | {s['field_orders']} |")
    lines += ["", *_gap_table(results), "", *_scale_table(scale)]
    return "\n".join(lines) + "\n"


def _gap_table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        ("Repetition bound (WORKLOADS.md) against what an ordering can reach. *Item ceiling*: an "
        "upper bound on item-level reuse for any ordering, since a prompt has one prefix (see "
        "`item_ceiling`); partial matches of lines come on top of it, which is why prev_lcp can "
        "pass both. *GGR*: the better prev_lcp of its two variants. *Gap closed*: "
        "(llmsql - GGR) / (bound - GGR) on prev_lcp, where the bound exceeds GGR by more than "
        "2 points."),
        "",
        "| workload | repetition bound | item ceiling | GGR prev_lcp | llmsql prev_lcp | gap closed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ms = r["methods"]
        g = max(ms["GGR"]["prev_lcp"], ms["GGR (one part)"]["prev_lcp"])
        o, b = ms["llmsql"]["prev_lcp"], r["repetition_bound"]
        closed = f"{(o - g) / (b - g):.0%}" if b - g > 0.02 else "n/a (gap under 2 points)"
        lines.append(f"| {r['id']} | {b:.4f} | {r['item_ceiling']:.4f} | {g:.4f} | {o:.4f} | "
                     f"{closed} |")
    return lines


def _scale_table(scale: list[dict[str, Any]]) -> list[str]:
    lines = [("Scale test (llmsql solver only, W2's five fields; input as Arrow string arrays, as "
             "an executor hands them over, or as Python lists of str):"), "",
             "| table | rows | input | solver wall s | solver CPU s |", "|---|---:|---|---:|---:|"]
    lines += [f"| {s['table']} | {s['rows']:,} | {s['input']} | {s['solver_wall_s']:.2f} | "
              f"{s['solver_cpu_s']:.2f} |" for s in scale]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", type=Path, default=REPO / ".." / "shared" / "datasets")
    ap.add_argument("--scorer", type=Path,
                    default=REPO / ".." / "shared" / "bench" / "prefix_score.py")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--repeat", type=int, default=5, help="timing repeats for llmsql")
    ap.add_argument("--jobs", type=int, default=2, help="scoring processes")
    ap.add_argument("--only", nargs="*", default=[], help="workload ids to run (default all)")
    ap.add_argument("--no-scale", action="store_true", help="skip the scale test")
    ap.add_argument("--scale-repeat", type=int, default=2, help="timing repeats, scale test")
    a = ap.parse_args(argv)
    meta = describe_machine(numpy=np.__version__, pandas=pd.__version__)
    results = bench_workloads(a.datasets.resolve(), a.scorer.resolve(), a.repeat, a.jobs, a.only)
    scale = [] if a.no_scale else bench_scale(a.datasets.resolve(), a.scale_repeat)
    meta["load_average_end"] = os.getloadavg()
    a.out.mkdir(parents=True, exist_ok=True)
    doc = {"machine": meta, "block": 64, "workloads": results, "scale": scale}
    (a.out / "prefix_reuse.json").write_text(json.dumps(doc, indent=2) + "\n")
    (a.out / "prefix_reuse.md").write_text(markdown(meta, results, scale))
    return 0


if __name__ == "__main__":
    sys.exit(main())
