#!/usr/bin/env python3
"""vLLM's batch-invariant mode (the vllm backend's ``deterministic=True``): what it costs and
what it buys, measured on the GPU machine in one call.

For each mode (off, on) a fresh process builds the vllm backend (Llama-3-8B shape, random
weights, bf16, prefix caching) and answers the same prompts twice:

- **A, as llmsql sends them**: the W1 filter prompts (Yes/No, one step) and the W1b projection
  prompts (48 tokens), rendered by the optimizer (``explain(prompts=...)``) and sent in its
  order as one engine call each; timed (the cost of the mode).
- **B, other batches**: the same prompts shuffled and sent 7 at a time; not timed.

An answer is the generated token text; a prompt whose answer differs between A and B is one
the batch changed. Random weights make the answers noise, but noise computed the same way:
any difference is the batch's doing.

Usage (GPU machine, after bench/gpu/device.sh's unpacking; see bench/gpu/README.md):
    python bench/gpu/deterministic.py --model .stage/model --data .gpudata --rows 2000 \
        --out $OUT/deterministic.json
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.gpu.workloads import WORKLOADS

CALLS = {"W1": ("choice", 1), "W1b": ("free", 48)}


def prompts_of(model: str, data: Path, rows: int) -> dict[str, list[str]]:
    """Each call's prompts in llmsql's send order (dry run: no model is loaded)."""
    import llmsql

    out = {}
    con = llmsql.connect(dry_run=True, model=model, cache=False)
    con.duckdb.execute(f"CREATE VIEW movie_reviews AS SELECT * FROM "
                       f"'{(data / 'movie_reviews.parquet').as_posix()}' LIMIT {rows}")
    for w in WORKLOADS:
        if w.wid in CALLS:
            with tempfile.NamedTemporaryFile(suffix=".jsonl") as f:
                con.explain(w.sql, prompts=f.name)
                lines = Path(f.name).read_text().splitlines()
                out[w.wid] = [json.loads(line)["prompt"] for line in lines]
    con.close()
    return out


def requests(wid: str, prompts: list[str]) -> list[Any]:
    from llmsql.backends.base import Request

    kind, n = CALLS[wid]
    if kind == "choice":
        return [Request(p, max_tokens=n, choices=("Yes", "No")) for p in prompts]
    return [Request(p, max_tokens=n, ignore_eos=True) for p in prompts]


def child(a: argparse.Namespace) -> None:
    """One mode, in its own process (vLLM reads VLLM_BATCH_INVARIANT when it starts)."""
    from llmsql.backends import BackendSpec, get_backend

    t0 = time.perf_counter()
    backend = get_backend(BackendSpec.make(
        "vllm", a.model, deterministic=a.mode == "on", load_format="dummy",
        attention_backend="TRITON_ATTN", chat_template=False, gpu_memory_utilization=0.85,
        dtype="bfloat16", max_model_len=4096, enforce_eager=False, startup_timeout=900))
    result: dict[str, Any] = {"mode": a.mode, "load_s": time.perf_counter() - t0,
                              "model_id": backend.model_id(), "calls": {}}
    for wid, prompts in json.loads(Path(a.prompts).read_text()).items():
        reqs = requests(wid, prompts)
        backend.reset_prefix_cache()
        t0 = time.perf_counter()
        first = backend.generate(reqs)
        took = time.perf_counter() - t0
        order = list(range(len(reqs)))
        random.Random(0).shuffle(order)
        second: dict[int, str] = {}
        backend.reset_prefix_cache()
        for k in range(0, len(order), 7):
            part = order[k:k + 7]
            for i, r in zip(part, backend.generate([reqs[i] for i in part]), strict=True):
                second[i] = r.text
        result["calls"][wid] = {
            "prompts": len(reqs), "seconds": took,
            "prompt_tokens": sum(r.prompt_tokens for r in first),
            "cached_tokens": sum(r.cached_tokens for r in first),
            "output_tokens": sum(r.output_tokens for r in first),
            "answers_changed_by_batching": sum(first[i].text != second[i] for i in order),
            "distinct_answers": len({r.text for r in first}),
            "answer_samples": [r.text for r in first[:3]],
        }
        print(a.mode, wid, result["calls"][wid], flush=True)
    backend.close()
    Path(a.out).write_text(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", type=Path, default=Path(".gpudata"))
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=("off", "on"))
    p.add_argument("--prompts")
    a = p.parse_args()
    if a.mode:
        child(a)
        return
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.json"
        prompts.write_text(json.dumps(prompts_of(a.model, a.data, a.rows)))
        modes = {}
        for mode in ("off", "on"):
            out = Path(tmp) / f"{mode}.json"
            subprocess.run([sys.executable, __file__, "--model", a.model, "--mode", mode,
                            "--prompts", str(prompts), "--out", str(out)], check=True)
            modes[mode] = json.loads(out.read_text())
    from bench.gpu.run_gpu import device_name

    cost = {w: modes["on"]["calls"][w]["seconds"] / modes["off"]["calls"][w]["seconds"]
            for w in modes["off"]["calls"]}
    Path(a.out).write_text(json.dumps({"device": device_name(), "rows": a.rows,
                                       "modes": modes, "slowdown_on_vs_off": cost}, indent=1))
    print("slowdown (on / off):", cost)


if __name__ == "__main__":
    main()
