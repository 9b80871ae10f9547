#!/usr/bin/env python3
"""Merge run_gpu.py's raw JSON files into bench/results/gpu.json, gpu.md and gpu.png.

Usage: python bench/gpu/report.py --capped-on A.json --capped-off B.json --full-on C.json
       [--full-off D.json] [--out bench/results]

Definitions (issue 6):
- floor_s = uncached prompt tokens / prefill rate + decode steps x decode step time, both
  rates measured in the same engine on uniform synthetic batches (run_gpu.py); decode steps
  = ceil(prompts / decode batch) x output tokens per prompt.
- token bound = uncached tokens under shuffled / under optimized (vLLM's cached-token counts);
  the speedup over shuffled is compared with it.
- gpu_s = time inside the engine's generate; overhead_share = (wall - gpu_s) / wall, i.e.
  llmsql's planning, DuckDB, optimizer and marshalling.
- compute floor = uncached tokens x 2 x parameters / measured bf16 matmul ceiling, compared
  with the prefill part of the run (engine time minus the decode estimate).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TITLES = {"W1": "movies filter", "W1b": "movies projection", "W1c": "movies multi-LLM",
          "W1d": "movies aggregation", "W2": "beer filter", "W3": "squad RAG",
          "W4": "paper movies"}
PAPER = {"W1": 2.5, "W1b": 2.4, "W1c": 1.7, "W1d": 2.5, "W2": 2.0, "W3": 1.7, "W4": None}
TABLE_OF = {"W1": "movie_reviews", "W1b": "movie_reviews", "W1c": "movie_reviews",
            "W1d": "movie_reviews", "W2": "beer_reviews", "W3": "squad_dev",
            "W4": "movies_small"}


def load(path: str | None) -> dict[str, Any] | None:
    return json.loads(Path(path).read_text()) if path else None


def floor_s(run: dict[str, Any], syn: dict[str, float]) -> float:
    uncached = run["prompt_tokens"] - run["cached_tokens"]
    per_prompt = run["output_tokens"] / max(1, run["prompts"])
    steps = math.ceil(run["prompts"] / syn["decode_batch"]) * per_prompt
    return uncached / syn["prefill_tokens_per_s"] + steps * syn["decode_step_s"]


def decode_estimate(run: dict[str, Any], syn: dict[str, float]) -> float:
    per_prompt = run["output_tokens"] / max(1, run["prompts"])
    return math.ceil(run["prompts"] / syn["decode_batch"]) * per_prompt * syn["decode_step_s"]


def profile(run: dict[str, Any]) -> dict[str, Any]:
    """Where a run's time went, from vLLM's counters and llmsql's per-call trace."""
    m = run.get("vllm_metrics") or {}
    p = run.get("profile") or {}
    steps = run.get("engine_steps")
    return {
        "wall_s": run["wall_s"], "engine_s": run["engine_s"],
        "engine_steps": steps,
        "tokens_per_step": run.get("tokens_per_step"),
        "output_tokens_per_step": run["output_tokens"] / steps if steps else None,
        "ms_per_step": 1000 * run["engine_s"] / steps if steps else None,
        "preemptions": m.get("num_preemptions"),
        "engine_calls": p.get("generate_calls", 0) + p.get("warmup_calls", 0),
        "warmup_only_calls": p.get("warmup_calls"),
        "uncached_tokens": run["prompt_tokens"] - run["cached_tokens"],
    }


def section(on: dict[str, Any], off: dict[str, Any] | None, ceiling: float | None
            ) -> dict[str, Any]:
    syn = on["synthetic"]
    out: dict[str, Any] = {}
    for wid, runs in on["runs"].items():
        sh, op = runs["shuffled"], runs["optimized"]
        nc = off["runs"][wid]["table_order"] if off and wid in off["runs"] else None
        unc_sh = sh["prompt_tokens"] - sh["cached_tokens"]
        unc_op = op["prompt_tokens"] - op["cached_tokens"]
        fl = floor_s(op, syn)
        bound = unc_sh / max(1, unc_op)
        speed = sh["wall_s"] / op["wall_s"]
        row: dict[str, Any] = {
            "title": TITLES[wid],
            "rows": on["rows"].get(TABLE_OF[wid]),
            "no_cache_s": nc["wall_s"] if nc else None,
            "shuffled_s": sh["wall_s"],
            "optimized_s": op["wall_s"],
            "floor_s": fl,
            "optimized_over_floor": op["wall_s"] / fl,
            "gpu_s": op["engine_s"],
            "prompt_tokens": op["prompt_tokens"],
            "prompt_tokens_shuffled": sh["prompt_tokens"],
            "cached_tokens_shuffled": sh["cached_tokens"],
            "cached_tokens_optimized": op["cached_tokens"],
            "uncached_tokens_no_cache": nc["prompt_tokens"] if nc else None,
            "uncached_tokens_shuffled": unc_sh,
            "uncached_tokens_optimized": unc_op,
            "output_tokens": op["output_tokens"],
            "prompts_sent": op["prompts"],
            "token_bound": bound,
            "speedup_vs_shuffled": speed,
            "speedup_share_of_token_bound": speed / bound,
            "speedup_vs_no_cache": (nc["wall_s"] / op["wall_s"]) if nc else None,
            "paper_ggr_speedup_vs_unordered_L4": PAPER[wid],
            "overhead_share": (op["wall_s"] - op["engine_s"]) / op["wall_s"],
            "overhead_share_shuffled": (sh["wall_s"] - sh["engine_s"]) / sh["wall_s"],
            "prefill_tokens_per_s": unc_op / max(1e-9, op["engine_s"] - decode_estimate(op, syn)),
            "decode_tokens_per_s": op["output_tokens"] / max(1e-9, op["engine_s"]),
        }
        row["profile"] = {name: profile(run) for name, run in runs.items()}
        if nc:
            row["profile"]["no_cache"] = profile(nc)
        if "optimized_no_warmups" in runs:
            row["optimized_no_warmups_s"] = runs["optimized_no_warmups"]["wall_s"]
        if ceiling:
            compute = unc_op * 2 * on["params"] / (ceiling * 1e12)
            prefill_time = max(1e-9, op["engine_s"] - decode_estimate(op, syn))
            row["compute_floor_s"] = compute
            row["compute_floor_fraction"] = compute / prefill_time
        out[wid] = row
    return out


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# GPU benchmark: llmsql on vLLM (issue 6)",
        "",
        f"- device: {doc['device']}; engine: {doc['engine']}; model: {doc['model']} "
        f"({doc['params'] / 1e9:.2f} B parameters, random weights, bf16, CUDA graphs)",
        f"- bf16 matmul ceiling measured in the same session: {doc['matmul_bf16_tflops']:.0f} "
        "TFLOP/s",
        f"- synthetic rates (capped engine): prefill {doc['synthetic']['prefill_tokens_per_s']:,.0f}"
        f" tok/s, decode step {1000 * doc['synthetic']['decode_step_s']:.1f} ms at batch "
        f"{doc['synthetic']['decode_batch']}",
        f"- KV cache: capped at {doc['kv_cache_tokens']:,} tokens (top table); full: "
        f"{doc.get('full_cache_kv_tokens') or 'the engine default at 0.85 memory'} (bottom)",
        "- slices: first N rows by key; "
        + ", ".join(f"{t} {n:,}" for t, n in doc["rows"].items() if n),
        "- three configurations per workload: no prefix cache + table order (its own engine); "
        "prefix cache + rows shuffled (seed 0); prefix cache + llmsql's plan (these two in one "
        "engine, side by side). The baselines are plain vLLM: llmsql neither reorders nor "
        "warms prefixes for them. Prefix cache reset before every run; llmsql's result cache "
        "off; LLM_FILTER decoded in one step (the choices' first tokens) in every "
        "configuration.",
        "",
    ]
    for title, key in (("Capped cache (targets)", "workloads"), ("Full cache", "full_cache")):
        lines += [f"## {title}", "",
                  "| wl | rows | no cache s | shuffled s | optimized s | floor s | opt/floor | "
                  "uncached shuffled | uncached opt | token bound | speedup vs shuffled "
                  "(share of bound) | vs no cache | paper GGR (L4) | overhead |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for wid, r in doc[key].items():
            nc = f"{r['no_cache_s']:.2f}" if r["no_cache_s"] else "–"
            vs = f"{r['speedup_vs_no_cache']:.2f}x" if r["speedup_vs_no_cache"] else "–"
            paper = f"{r['paper_ggr_speedup_vs_unordered_L4']}x" \
                if r["paper_ggr_speedup_vs_unordered_L4"] else "–"
            lines.append(
                f"| {wid} | {r['rows']:,} | {nc} | {r['shuffled_s']:.2f} | "
                f"{r['optimized_s']:.2f} | {r['floor_s']:.2f} | {r['optimized_over_floor']:.2f} | "
                f"{r['uncached_tokens_shuffled']:,} | {r['uncached_tokens_optimized']:,} | "
                f"{r['token_bound']:.2f} | {r['speedup_vs_shuffled']:.2f}x "
                f"({100 * r['speedup_share_of_token_bound']:.0f}%) | {vs} | {paper} | "
                f"{100 * r['overhead_share']:.1f}% |")
        lines.append("")
    lines += ["## Profile (capped cache): where the time goes", "",
              "From vLLM's own counters (`log_stats`: engine steps, tokens computed per step, "
              "preemptions) and llmsql's per-call trace (engine calls). \"warm_prefixes rule "
              "off\": the optimized order sent in 2,048-prompt calls without the rule's "
              "cache-bounded windows (`connect(warm_prefixes=False)`).", "",
              "| wl | run | wall s | engine steps | ms/step | computed tokens/step | output "
              "tokens/step | preemptions | engine calls | uncached tokens |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    shown = {"optimized_no_warmups": "optimized, warm_prefixes rule off"}
    for wid, r in doc["workloads"].items():
        for name, p in r["profile"].items():
            if p["engine_steps"] is None:
                continue
            lines.append(
                f"| {wid} | {shown.get(name, name)} | {p['wall_s']:.2f} | {p['engine_steps']:,.0f} | "
                f"{p['ms_per_step']:.1f} | {p['tokens_per_step']:,.0f} | "
                f"{p['output_tokens_per_step']:,.0f} | {p['preemptions'] or 0:,.0f} | "
                f"{p['engine_calls']} | {p['uncached_tokens']:,} |")
    lines.append("")
    if doc.get("notes_md"):
        lines += [doc["notes_md"].rstrip(), ""]
    return "\n".join(lines)


def chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["workloads"]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.2
    series = (("no_cache_s", "no prefix cache, table order"),
              ("shuffled_s", "prefix cache, shuffled"),
              ("optimized_s", "prefix cache, llmsql plan"), ("floor_s", "floor"))
    for k, (key, label) in enumerate(series):
        vals = [rows[n][key] or 0 for n in names]
        ax.bar([i + (k - 1.5) * width for i in range(len(names))], vals, width, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("seconds")
    ax.set_title(f"llmsql on {doc['engine']}, {doc['device']}, KV cache capped at "
                 f"{doc['kv_cache_tokens']:,} tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capped-on", required=True)
    ap.add_argument("--capped-off", required=True)
    ap.add_argument("--full-on", required=True)
    ap.add_argument("--full-off")
    ap.add_argument("--notes", help="a Markdown file appended to gpu.md (the analysis)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    a = ap.parse_args()
    con, coff, fon, foff = (load(p) for p in (a.capped_on, a.capped_off, a.full_on, a.full_off))
    assert con
    assert fon
    ceiling = con.get("matmul_bf16_tflops")
    doc = {
        "device": con["device"], "engine": con["engine"], "model": con["model"],
        "params": con["params"], "matmul_bf16_tflops": ceiling,
        "kv_cache_tokens": con["kv_tokens_override"], "full_cache_kv_tokens": None,
        "synthetic": con["synthetic"], "synthetic_full_cache": fon["synthetic"],
        "rows": con["rows"],
        "workloads": section(con, coff, ceiling),
        "full_cache": section(fon, foff, ceiling),
        "notes": "no_cache_s in full_cache is null when the full-cache engine was not run "
                 "without prefix caching (see gpu.md)",
        "raw": {"capped_on": a.capped_on, "capped_off": a.capped_off, "full_on": a.full_on,
                "full_off": a.full_off},
    }
    notes = Path(a.notes).read_text() if a.notes else ""
    out = Path(a.out)
    (out / "gpu.json").write_text(json.dumps(doc, indent=1))
    (out / "gpu.md").write_text(markdown({**doc, "notes_md": notes}))
    chart(doc, out / "gpu.png")
    print(markdown(doc))


if __name__ == "__main__":
    main()
