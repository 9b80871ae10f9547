"""Issue 15's end-to-end workload: a 2,000-row LLM_FILTER over W1 rows through SQL, with expert
offload on one GPU.

The OLMoE-1B-7B shape of ``bench/moe_offload.py`` (16 layers, 64 experts, top-8, hidden 2048,
expert FFN 1024; 12.9 GB of experts in bf16) with random bf16 weights, but with the embedded
SmolLM2 tokenizer's vocabulary (49,152) and its tokenizer files, is saved as a model folder on
the GPU machine's disk; then W1's query (``../shared/bench/WORKLOADS.md``, exact SQL and the
default rendering) runs on DuckDB through ``llmsql.connect`` over the first 2,000 W1 rows (the
smallest ``review_id``), once per expert plan, each time loading the model as the
``transformers`` backend does (``device="cuda"``, bf16, ``expert_cache=0.4``, ``moe_plan=``):

- ``all_resident``: no expert offload, the whole model on the GPU (the compute reference);
- ``auto``, ``layer_sweep``, ``lru``, ``predictive`` (next-router predictor: random weights
  have no learnable routing, so no ``moe-profile``).

Per plan the JSONL row has the model load time, the query's wall time, the engine's forward
passes (a step timer: synchronized, with each pass's token count), rows in and out, tokens,
the call's ANALYZE ``moe measured`` line and the offload runtime's counters (bytes moved, hit
rate, waits, plans run), peak GPU memory, and the floor: the expert bytes that must move
(every forward pass, each used expert not in the 40% cache: uniform routing, as random
weights route) over the measured pinned host-to-device rate, or the all-resident query's time
if larger (compute). The backend runs with ``batch_size=192`` rows per engine chunk (a chunk
is three forward passes: shared prefixes, prompts, Yes/No scoring; 11 chunks, 33 passes. The
scoring pass holds each row's KV once per choice: at 192 rows the largest is 316,416 padded
token slots, 38.6 GiB in bf16 with the 13 GiB of resident weights beside it; 256 rows would
be 51.5 GiB, too close to an H100's 78 GiB) and
``invariance_margin=0``: with random weights many Yes/No scores are near ties, and the
batch-invariance guard would re-run each alone (a full expert sweep per row). The session
hands the backend all 2,000 prompts at once (``batch_size=2000``) with the result cache off.

Prepare here (PyPI and ../shared reachable), from the repository root::

    python bench/moe_sql.py --prepare    # .gpu_data/moe_sql (W1 rows + tokenizer, 3.7 MB)
                                          # .whl_moe_sql (duckdb 2.0.0 + sqlglot, ~25 MB)

The GPU image has torch, transformers, accelerate, numpy, pandas, pyarrow, cloudpickle and
mypy_extensions; of what ``import llmsql`` and a DuckDB query need it lacks only duckdb and
sqlglot. Both folders are git-ignored (``.git/info/exclude``); with the tracked tree (~2 MB)
one call carries about 31 MB. Run on the GPU machine (one call, about 6-8 minutes; plans that
would pass ``--budget`` seconds are skipped and say so)::

    run(carry=[".whl_moe_sql", ".gpu_data/moe_sql"], timeout_s=600, command=
      "set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile "
      "--no-cache-dir --upgrade --target /tmp/site .whl_moe_sql/*.whl || exit 9; "
      "export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false "
      "HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "
      "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True; df -h /tmp | tail -1; "
      "python3 bench/moe_sql.py --out $OUT 2>&1 | tee $OUT/moe_sql.log")

Then here: copy ``moe_sql.jsonl`` from the returned files to ``bench/results/`` and run
``python bench/moe_sql_report.py bench/results/moe_sql.jsonl > bench/results/moe_sql.md``.
``--plans`` picks plans (e.g. ``--plans all_resident,auto`` for a short call), ``--rows`` and
``--chunk`` the size. A second call on the still-warm machine reuses the saved model folder
(``/tmp/moe_sql_model``, checked against the config); keep ``all_resident`` in every call, as
it is that call's compute floor and warms CUDA up.

Expected on an H100: build about 5 s, save about 35 s (13.8 GB; a 2-layer cut saved in 4 s
here), each load 10-30 s (from the page cache, then 12.9 GB copied to pinned host memory), each
offload query 10-60 s (33 forward passes; bench/results/moe_offload.md measured 0.3-1 s per
saturated step); about 6-8 minutes in all, and ``--budget`` (540 s) skips what would not
fit. ``--smoke`` runs all of it on the CPU with a tiny MoE shape and 20 rows (real DuckDB, SQL
and tokenizer; it measures nothing; its JSONL goes to /tmp/moe_sql_smoke_out).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu.workloads import TABLES, WORKLOADS

DATA = ROOT / ".gpu_data" / "moe_sql"
WHEELS = ROOT / ".whl_moe_sql"
TABLE_FILE = "w1_rows.parquet"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
W1 = next(w for w in WORKLOADS if w.wid == "W1")
PLANS = ("all_resident", "auto", "layer_sweep", "lru", "predictive")
CACHE_SHARE = 0.4
WHEEL_PINS = ("duckdb==2.0.0", "sqlglot")  # sqlglot: this machine's version
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def say(obj: Any) -> None:
    print(obj if isinstance(obj, str) else json.dumps(obj), flush=True)


# ---- preparing (here) ---------------------------------------------------------------------


def prepare(rows: int, datasets: Path, wheels: bool) -> None:
    """Write the W1 rows and the tokenizer files to DATA; download the wheels to WHEELS."""
    import duckdb

    from llmsql.models import resolve_model

    DATA.mkdir(parents=True, exist_ok=True)
    table = TABLES[W1.table]
    src = (datasets / table.path).as_posix()
    con = duckdb.connect()
    con.sql(f"COPY (SELECT review_id, movie_id, synopsis, genre, director, review FROM "
            f"'{src}' ORDER BY {table.key} LIMIT {rows}) TO '{DATA / TABLE_FILE}' "
            "(FORMAT parquet, COMPRESSION zstd)")
    tok = DATA / "tokenizer"
    tok.mkdir(exist_ok=True)
    embedded = resolve_model(None)
    for name in TOKENIZER_FILES:
        shutil.copy2(embedded / name, tok / name)
    say(f"wrote {DATA} ({rows} rows of {table.path}, tokenizer of {embedded})")
    if wheels:
        import sqlglot

        pins = [p if "==" in p else f"{p}=={sqlglot.__version__}" for p in WHEEL_PINS]
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps",
               "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
               *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(WHEELS), *pins]
        subprocess.run(cmd, check=True)
        say(f"wheels in {WHEELS}: {sorted(p.name for p in WHEELS.glob('*.whl'))}")


# ---- the model (on the machine that runs) ------------------------------------------------


def olmoe_config(smoke: bool) -> Any:
    """OLMoE-1B-7B (as bench/moe_offload.py) with SmolLM2's vocabulary and special tokens."""
    import transformers as tf

    shape = dict(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                 num_attention_heads=16, num_key_value_heads=16, num_experts=64,
                 num_experts_per_tok=8)
    if smoke:
        shape = dict(hidden_size=64, intermediate_size=32, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=4, num_experts=16,
                     num_experts_per_tok=4)
    return tf.OlmoeConfig(vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                          max_position_embeddings=4096, tie_word_embeddings=False, **shape)


def build_model(folder: Path, device: str) -> dict[str, Any]:
    """Random weights of the config in ``folder`` (bf16 on a GPU), saved with the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    smoke = device == "cpu"
    config = olmoe_config(smoke)
    marker = folder / "moe_sql.json"
    if marker.is_file() and json.loads(marker.read_text()) == config.to_dict():
        return {"reused": True}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32 if smoke else torch.bfloat16)
    if device == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy2(DATA / "tokenizer" / name, folder / name)
    marker.write_text(json.dumps(config.to_dict()))
    t2 = time.perf_counter()
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    size = sum(p.stat().st_size for p in folder.iterdir())
    return {"build_s": t1 - t0, "save_s": t2 - t1, "folder_gb": size / 1e9}


def h2d_rate(device: str) -> float:
    """Pinned host-to-device copy rate of 1 GiB (the median of five), bytes per second."""
    import torch

    if device != "cuda":
        return 25e9  # the cost model's default; the smoke measures nothing
    src = torch.empty(2**30, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(2**30, dtype=torch.uint8, device=device)
    times = []
    for _ in range(6):
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    del src, dst
    torch.cuda.empty_cache()
    return 2**30 / sorted(times[1:])[2]


# ---- one plan through SQL -----------------------------------------------------------------


def backend_spec(folder: Path, plan: str, device: str, chunk: int) -> Any:
    from llmsql.backends.base import BackendSpec

    options: dict[str, Any] = {"device": device, "dtype": "auto", "batch_size": chunk,
                               "invariance_margin": 0}
    if device == "cpu":
        options["threads"] = 1
    if plan != "all_resident":
        options |= {"expert_cache": CACHE_SHARE, "moe_plan": plan}
    return BackendSpec.make("transformers", str(folder), **options)


def run_plan(folder: Path, plan: str, device: str, chunk: int, rows: int) -> dict[str, Any]:
    """Load the model for ``plan`` as the transformers backend, run W1 through SQL, measure.

    ``all_resident`` (the compute floor) first runs W1 over 32 rows, untimed, so that its
    figure holds no CUDA start-up (the offload plans run after it, in a warm process).
    """
    import torch

    import llmsql
    from llmsql.backends.transformers import TransformersBackend

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    backend = TransformersBackend(backend_spec(folder, plan, device, chunk))
    load_s = time.perf_counter() - t0
    timer = width_timer()
    backend.engine.timer = timer
    warm_s = None
    try:
        with llmsql.connect(backend=backend, batch_size=rows, cache=False,
                            progress=False) as con:
            if plan == "all_resident":
                warm_s = timed_query(con, min(32, rows))[0]
                timer.steps.clear()
                timer.widths.clear()
            query_s, result = timed_query(con, rows)
            out_rows = len(result)
            calls = result.stats.calls
        moe = backend.moe_stats()
        reruns = backend.canonical_reruns
    finally:
        backend.close()
        gc.collect()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    steps = step_figures(timer)
    steps["max_kv_gib"] = steps["max_kv_cells"] * kv_bytes_per_token(folder) / 2**30
    return {"load_s": load_s, "warmup_s": warm_s, "query_s": query_s, "rows_out": out_rows,
            **call_figures(calls), **steps, "canonical_reruns": reruns,
            "offload": offload_figures(moe), "peak_gpu_gib": peak}


def timed_query(con: Any, rows: int) -> tuple[float, Any]:
    """(Re)create the W1 table with its first ``rows`` rows, run W1; (seconds, result)."""
    con.duckdb.execute(f"CREATE OR REPLACE TABLE {W1.table} AS SELECT * FROM "
                       f"read_parquet('{(DATA / TABLE_FILE).as_posix()}') "
                       f"ORDER BY review_id LIMIT {rows}")
    t = time.perf_counter()
    result = con.sql(W1.sql)
    return time.perf_counter() - t, result


def kv_bytes_per_token(folder: Path) -> int:
    """KV cache bytes per token over all layers (bf16 on the GPU, fp32 in the smoke)."""
    cfg = json.loads((folder / "config.json").read_text())
    head = cfg["hidden_size"] // cfg["num_attention_heads"]
    size = 2 if cfg.get("dtype") == "bfloat16" else 4
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head * size


def width_timer() -> Any:
    """A step timer that also keeps each pass's padded (rows, columns): the KV's size."""
    from llmsql.engine.timing import StepTimer

    class WidthTimer(StepTimer):
        def __init__(self) -> None:
            super().__init__()
            self.widths: list[tuple[int, int]] = []

        def step(self, kind: str, new: Any, full: Any) -> Any:
            self.widths.append((int(full.shape[0]), int(full.shape[1])))
            return super().step(kind, new, full)

    return WidthTimer()


def call_figures(calls: list[Any]) -> dict[str, Any]:
    c = calls[0] if calls else None
    if c is None:
        return {"calls": 0}
    return {"calls": len(calls), "rows_in": c.rows_in, "sent": c.sent,
            "prompt_tokens": c.prompt_tokens, "cached_tokens": c.cached_tokens,
            "true_answers": c.true_answers, "failed": c.failed, "null_answers": c.null_answers,
            "call_s": c.seconds, "generate_s": c.generate_seconds, "moe_line": c.moe,
            "notes": list(c.notes)}


def step_figures(timer: Any) -> dict[str, Any]:
    steps = timer.steps
    kinds: dict[str, dict[str, float]] = {}
    for s in steps:
        k = kinds.setdefault(s.kind, {"n": 0, "tokens": 0, "seconds": 0.0, "max_rows": 0})
        k["n"] += 1
        k["tokens"] += s.tokens
        k["seconds"] += s.seconds
        k["max_rows"] = max(k["max_rows"], s.rows)
    return {"forwards": len(steps), "engine_s": sum(s.seconds for s in steps),
            "computed_tokens": sum(s.tokens for s in steps), "step_kinds": kinds,
            "step_tokens": [s.tokens for s in steps],
            "max_kv_cells": max((r * w for r, w in timer.widths), default=0)}


def offload_figures(stats: Any) -> dict[str, Any] | None:
    if stats is None:
        return None
    out = {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}
    out["plans"] = dict(out.get("plans") or ())
    for name in ("hit_rate", "prefetch_precision"):
        out[name] = getattr(stats, name, None)
    return out


def floor(row: dict[str, Any], folder: Path, rate: float, resident_s: float | None
          ) -> dict[str, Any]:
    """The PCIe floor of the run's forward passes (uniform routing, 40% cache), or compute."""
    from llmsql.backends.moe_glue import moe_shape
    from llmsql.moe.plan import experts_used, slots_for

    shape = moe_shape(folder, dtype="bfloat16")
    slots = slots_for(shape, CACHE_SHARE)
    must = sum(max(experts_used(shape, t) * shape.moe_layers - slots, 0.0)
               for t in row["step_tokens"]) * shape.expert_bytes
    pcie_s = must / rate
    floor_s = max(pcie_s, resident_s or 0.0)
    return {"must_move_gb": must / 1e9, "floor_pcie_s": pcie_s, "floor_compute_s": resident_s,
            "floor_s": floor_s, "vs_floor": row["query_s"] / floor_s if floor_s else None}


# ---- the run ------------------------------------------------------------------------------


def environment(device: str) -> dict[str, Any]:
    import duckdb
    import pyarrow
    import sqlglot
    import torch
    import transformers

    return {"run": "env", "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "duckdb": duckdb.__version__, "sqlglot": sqlglot.__version__,
            "pyarrow": pyarrow.__version__, "python": platform.python_version(),
            "cpus": os.cpu_count()}


def shape_figures(folder: Path) -> dict[str, Any]:
    from llmsql.backends.moe_glue import moe_shape
    from llmsql.moe.plan import slots_for

    shape = moe_shape(folder, dtype="bfloat16")
    return {"layers": shape.moe_layers, "experts": shape.experts, "top_k": shape.top_k,
            "hidden": shape.hidden, "intermediate": shape.intermediate,
            "expert_gb": shape.total_expert_bytes / 1e9, "slots": slots_for(shape, CACHE_SHARE),
            "total_experts": shape.total_experts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepare", action="store_true", help="here: write the data and wheels")
    ap.add_argument("--no-wheels", action="store_true", help="--prepare without the wheels")
    ap.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    ap.add_argument("--smoke", action="store_true", help="tiny MoE on the CPU, 20 rows")
    ap.add_argument("--plans", default=",".join(PLANS))
    ap.add_argument("--rows", type=int, default=None, help="W1 rows (2000; smoke 20)")
    ap.add_argument("--chunk", type=int, default=None, help="rows per engine chunk (192; 8)")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds (540; smoke: none): a plan that would end later is skipped")
    ap.add_argument("--out", type=Path, default=None,
                    help="where the JSONL goes (bench/results; smoke: /tmp/moe_sql_smoke_out)")
    args = ap.parse_args()
    if args.prepare:
        prepare(args.rows or 2000, args.datasets, not args.no_wheels)
        return
    start = time.perf_counter()
    device = "cpu" if args.smoke else "cuda"
    rows = args.rows or (20 if args.smoke else 2000)
    chunk = args.chunk or (8 if args.smoke else 192)
    folder = args.model_dir or (Path("/tmp/moe_sql_smoke" if args.smoke else "/tmp/moe_sql_model"))
    out = args.out or (Path("/tmp/moe_sql_smoke_out") if args.smoke else ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    log = out / ("moe_sql_smoke.jsonl" if args.smoke else "moe_sql.jsonl")
    import torch

    if args.smoke:
        torch.set_num_threads(1)

    def emit(row: dict[str, Any]) -> None:
        row = {**row, "t": round(time.perf_counter() - start, 1)}
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        say({k: v for k, v in row.items() if k != "step_tokens"})

    emit(environment(device))
    built = build_model(folder, device)
    rate = h2d_rate(device)
    emit({"run": "setup", **built, "h2d_gb_s": rate / 1e9, "rows": rows, "chunk": chunk,
          "cache_share": CACHE_SHARE, "smoke": args.smoke, "sql": W1.sql,
          **shape_figures(folder)})
    run_plans(args, folder, device, rows, chunk, rate, start, emit)


def run_plans(args: Any, folder: Path, device: str, rows: int, chunk: int, rate: float,
              start: float, emit: Any) -> None:
    resident_s = None
    longest = 0.0
    for plan in [p for p in args.plans.split(",") if p]:
        elapsed = time.perf_counter() - start
        guess = longest or 90.0
        budget = args.budget or (float("inf") if args.smoke else 540.0)
        if elapsed + guess > budget:
            emit({"run": plan, "skipped": f"{elapsed:.0f} s gone, about {guess:.0f} s per "
                  f"plan, budget {budget:.0f} s"})
            continue
        say(f"-- {plan}: loading and running W1 over {rows} rows")
        t0 = time.perf_counter()
        try:
            row = run_plan(folder, plan, device, chunk, rows)
        except Exception as exc:  # a bench: record the failure, go on with the next plan
            emit({"run": plan, "error": f"{type(exc).__name__}: {exc}"})
            continue
        if plan == "all_resident":
            resident_s = row["query_s"]
        else:
            longest = max(longest, time.perf_counter() - t0)
        emit({"run": plan, **row, **floor(row, folder, rate, resident_s)})


if __name__ == "__main__":
    main()
