#!/usr/bin/env python3
"""Prefix-cache hits through a vLLM server with many requests in flight (issue 3, rule 4).

W4 (movies_small, 1,019 rows) through llmsql's `openai` backend with 16 requests in flight
against a running OpenAI-compatible vLLM server, with and without the ``warm_prefixes``
rule, in one run; the server's prefix cache is reset before each (it must run with
VLLM_SERVER_DEV_MODE=1 for /reset_prefix_cache, and --enable-prompt-tokens-details so
usage reports cached tokens). The ideal is the share of prompt characters an unbounded
cache of whole blocks could serve in the same send order (whole 32-token blocks taken as
128 characters).

Usage: python bench/server_warmup.py --base-url http://127.0.0.1:8011/v1 --model smollm2
       [--datasets ../shared/datasets] [--out bench/results/server_warmup]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import llmsql
from llmsql.optimizer.cost import simulate_prefix_cache

W4 = ("SELECT id FROM movies_small WHERE LLM_FILTER('Given the movie information and a critic "
      "review, does the review recommend watching the movie? Answer Yes or No.', movie_title, "
      "movie_info, review_content)")


def reset(base_url: str) -> None:
    root = base_url.rsplit("/v1", 1)[0]
    req = urllib.request.Request(root + "/reset_prefix_cache", method="POST", data=b"")
    urllib.request.urlopen(req, timeout=60).read()


def run(a: argparse.Namespace, warm: bool) -> dict[str, object]:
    con = llmsql.connect(backend="openai", base_url=a.base_url, model=a.model, cache=False,
                         progress=False, warm_prefixes=warm, concurrency=a.concurrency)
    con.register("movies_small", Path(a.datasets) /
                 "llmsql_paper_movies_sample/movies_small.parquet")
    ex = con.explain(W4, analyze=False)  # the send order (no model)
    hits = simulate_prefix_cache(ex.prompts, block_chars=128, capacity_blocks=1 << 40)
    ideal = sum(hits) / sum(len(p) for p in ex.prompts)
    reset(a.base_url)
    t0 = time.perf_counter()
    res = con.sql(W4)
    wall = time.perf_counter() - t0
    calls = res.stats.calls
    prompt = sum(c.prompt_tokens for c in calls)
    cached = sum(c.cached_tokens for c in calls)
    warm_n = sum(getattr(c, "warmup_prompts", 0) for c in calls)
    con.close()
    return {"warm_prefixes": warm, "wall_s": wall, "prompts": sum(c.sent for c in calls),
            "warmup_prompts": warm_n, "prompt_tokens": prompt, "cached_tokens": cached,
            "hit_rate": cached / prompt if prompt else 0.0, "ideal_char_share": ideal}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--datasets", default=str(REPO.parent / "shared" / "datasets"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "server_warmup"))
    a = ap.parse_args()
    runs = [run(a, warm=False), run(a, warm=True)]
    doc = {"workload": "W4", "rows": 1019, "concurrency": a.concurrency, "runs": runs}
    Path(a.out + ".json").write_text(json.dumps(doc, indent=1))
    lines = ["# W4 through a vLLM server, 16 requests in flight (issue 3, rule 4)", "",
             "| warm_prefixes | wall s | prompts | warm-ups | prompt tokens | cached tokens | "
             "hit rate | ideal (block share) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['warm_prefixes']} | {r['wall_s']:.1f} | {r['prompts']} | "
                     f"{r['warmup_prompts']} | {r['prompt_tokens']:,} | {r['cached_tokens']:,} | "
                     f"{100 * r['hit_rate']:.1f}% | {100 * r['ideal_char_share']:.1f}% |")
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
