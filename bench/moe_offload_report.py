"""Turn bench/moe_offload.py's JSON lines into the Markdown tables of the results file.

    python bench/moe_offload_report.py bench/results/moe_offload.jsonl \
        --routing bench/results/moe_routing.json > bench/results/moe_offload.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def load(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def speed_table(rows: list[dict[str, Any]], model: str) -> list[str]:
    runs = [r for r in rows if r.get("model") == model and "batch" in r]
    out = [f"### {model}", ""]
    setup = next((r for r in rows if r.get("model") == model and r["run"] == "setup"), None)
    check = next((r for r in rows if r.get("model") == model and r["run"] == "check"), None)
    if setup:
        out.append(f"{setup['experts']} experts, {setup['expert_gb']:.1f} GB in bf16; "
                   f"host-to-device copy {setup['h2d_gb_s']:.1f} GB/s (pinned, 1 GiB).")
    if check:
        out.append(f"Offloaded vs stock logits (bf16, 4×24 tokens): relative error "
                   f"{check['rel_err']:.2e}, same argmax {check['same_argmax']:.1%}.")
    out += ["", "| batch | run | decode tok/s | vs LRU | vs accelerate | decode step ms | "
            "hit rate | prefetch precision | GB moved / step | prefill tok/s | plans |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for batch in sorted({r["batch"] for r in runs}):
        group = [r for r in runs if r["batch"] == batch]
        base = {r["run"]: r["decode_tok_s"] for r in group}
        for r in group:
            lru, acc = base.get("lru"), base.get("accelerate")
            steps = r.get("steps", 1)
            moved = r.get("gb_h2d")
            out.append(
                f"| {batch} | {r['run']} | {r['decode_tok_s']:.1f} | "
                f"{_ratio(r['decode_tok_s'], lru)} | {_ratio(r['decode_tok_s'], acc)} | "
                f"{r['decode_step_s'] * 1e3:.1f} | {_pct(r.get('hit_rate'))} | "
                f"{_pct(r.get('prefetch_precision'))} | "
                f"{'' if moved is None else f'{moved / steps:.2f}'} | "
                f"{r['prefill_tok_s']:.0f} | {_plans(r.get('plans'))} |")
        auto = next((r for r in group if r["run"] == "auto"), None)
        if auto and auto.get("floor_step_s"):
            fixed = [r for r in group if r["run"] in ("lru", "layer_sweep")
                     or r["run"] == "predictive/next_router"]
            best = min(fixed, key=lambda r: r["decode_step_s"]) if fixed else None
            line = (f"| {batch} | auto vs PCIe floor | {auto['decode_step_s'] * 1e3:.1f} ms vs "
                    f"{auto['floor_step_s'] * 1e3:.1f} ms = "
                    f"{auto['decode_step_s'] / auto['floor_step_s']:.2f}x |")
            if best:
                line += (f" best fixed plan {best['run']} {best['decode_step_s'] * 1e3:.1f} ms "
                         f"(auto {auto['decode_step_s'] / best['decode_step_s'] - 1:+.0%}) |")
            out.append(line + " | | | | | | |")
    return [*out, ""]


def _ratio(x: float, base: float | None) -> str:
    return "" if not base else f"{x / base:.2f}x"


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:.0%}"


def _plans(plans: dict[str, int] | None) -> str:
    return "" if not plans else ", ".join(f"{k} {v}" for k, v in plans.items())


def routing_table(result: dict[str, Any]) -> list[str]:
    m = result["metrics"]
    out = ["## Predictor accuracy on real routing", "",
           f"Tiny OLMoE-shape MoE trained in the run for {result['train_steps']} steps "
           f"({result['train_s']:.0f} s) on {result['source']}; routing recorded on "
           f"{result['trace_tokens']:,} held-out tokens; {m['num_experts']} experts, top-"
           f"{m['top_k']}; the predictor trained on the first 90% of those tokens, measured on "
           f"the last 10% ({m['heldout_tokens']:,}).", "",
           "| lookahead | learned precision@k | recall@2k | next-router precision | "
           "best fixed set | chance |", "|---:|---:|---:|---:|---:|---:|"]
    for d in m["distances"]:
        nr = d.get("next_router_precision")
        out.append(f"| {d['distance']} | {d['precision']:.1%} | {d['recall_2k']:.1%} | "
                   f"{'' if nr is None else f'{nr:.1%}'} | {d['best_fixed_precision']:.1%} | "
                   f"{m['chance']:.1%} |")
    return [*out, ""]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("jsonl", type=Path, nargs="+")
    ap.add_argument("--routing", type=Path)
    args = ap.parse_args()
    rows = [r for p in args.jsonl for r in load(p)]
    envs = [r for r in rows if r.get("run") == "env"]
    lines = ["# MoE expert offload on one GPU (issue 15)", ""]
    lines += [f"- {e['gpu']}, torch {e['torch']}, transformers {e['transformers']}, Python "
              f"{e['python']}" for e in {json.dumps(e, sort_keys=True): e for e in envs}.values()]
    lines.append("")
    if args.routing and args.routing.exists():
        lines += routing_table(json.loads(args.routing.read_text()))
    lines += ["## Decode speed by plan and predictor", ""]
    for model in dict.fromkeys(r["model"] for r in rows if "model" in r):
        lines += speed_table(rows, model)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
