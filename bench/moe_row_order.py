"""Row order that helps experts (issue 15): the expert-cache hit rate with and without the
``expert_order`` rule, measured through the real offload runtime on the CPU.

1. A tiny MoE (OLMoE shape: 4 layers of 32 experts, top-4, hidden 128; byte-level tokens, so
   its routing is learned, not random) is trained on review text of ../shared/datasets
   (rotten_tomatoes reviews.parquet), one CPU thread, a few minutes.
2. Its routing is recorded on other review text and counted into a routing table (what
   ``llmsql moe-profile`` stores beside the predictor).
3. W1's rows (rotten_tomatoes movie_reviews, the 15,000 smallest review_id; fields synopsis,
   genre, director, review), those of the first movies until ``--rows``, are rendered as the
   prompts of a free-text LLM() call (W1b's instruction; W1's LLM_FILTER is scored, not
   decoded, and the rule leaves it alone, which the results show too) and ordered by the
   optimizer's rules: once without ``expert_order`` (the prefix-group order, sent as the
   executor does, in batches of 64 that the engine sorts by token ids and cuts into steps),
   once with it (``expert_order``: it moves rows only for a predicted saving of 10% or more),
   once in the order the table's signatures give without that gate (``table_order``), and
   once in an *oracle* order (:func:`order_rows` on each row's actual decode experts, run
   alone): the most an order by per-row experts could give. Orders whose steps are the same
   as an earlier one's are not run again.
4. Each order is run through the real engine (:class:`llmsql.engine.Engine`) with the experts
   offloaded (``offload_experts(model, MoEOptions(expert_cache=..., plan='lru'),
   device='cpu')``), steps of 1, 4 and 8 rows, every row decoding ``--decode`` tokens; the
   runtime's counters are read around every forward pass, so the hit rate and bytes of the
   decode steps are reported apart from the prefills'.

Also reported: how well a row's signature (the table's experts for the last N tokens of its
prompt) predicts the experts its decode steps use, for N = 4, 16, 64, 256 and the whole
prompt, and the experts per step that each order needs as measured on the rows' actual
decode routing (offline, no cache).

    python bench/moe_row_order.py               # about 10 minutes on one CPU thread
    python bench/moe_row_order.py --smoke       # a check of the script (seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlglot import exp  # noqa: E402

from llmsql.backends.base import Capabilities  # noqa: E402
from llmsql.engine import Engine  # noqa: E402
from llmsql.engine.experts import replace_experts  # noqa: E402
from llmsql.engine.moe import offload_experts  # noqa: E402
from llmsql.engine.moe.tiny import (  # noqa: E402
    BYTE_VOCAB_SIZE,
    SEPARATOR,
    lm_loss,
    read_texts,
    text_token_ids,
    tiny_moe_config,
    train_tiny_moe,
)
from llmsql.engine.moe.token_table import routing_table  # noqa: E402
from llmsql.engine.moe.trace import record_routing  # noqa: E402
from llmsql.engine.runner import Job  # noqa: E402
from llmsql.moe import MoEOptions  # noqa: E402
from llmsql.moe.affinity import (  # noqa: E402
    SIGNATURE_TOKENS,
    ExpertRouting,
    order_rows,
    signature,
)
from llmsql.moe.plan import MoEShape, slots_for  # noqa: E402
from llmsql.optimizer import RULES, RuleContext, optimize  # noqa: E402
from llmsql.optimizer.expert_order import expert_order, flat_groups  # noqa: E402
from llmsql.plan import Field, LLMCall, PromptBatch  # noqa: E402
from llmsql.udfs import CallKind  # noqa: E402
from llmsql.udfs.base import CallOptions  # noqa: E402
from llmsql.udfs.prompts import PromptTemplate  # noqa: E402

DATA = Path("/work/shared/datasets/rotten_tomatoes_flatiron")
W1_FIELDS = ("synopsis", "genre", "director", "review")
INSTRUCTION = "Summarize in one sentence what the critic liked or disliked about the movie."
FILTER = ("Given the movie information and a critic review, does the review recommend "
          "watching the movie? Answer Yes or No.")
CAPS = Capabilities(prefix_caching=True, constrained_choice=True, block_size=1,
                    batch_prefix_sharing=True, reports_cached_tokens=True)
"""The transformers backend's capabilities, as the optimizer sees them."""
EXECUTOR_BATCH = 64
"""The session's batch for the transformers backend (no scheduler batching)."""
SIGNATURE_SWEEP = (4, 16, 64, 256, 0)
"""Signature lengths compared (0: the whole prompt)."""


def w1_rows(limit: int) -> dict[str, list[str]]:
    """W1's fields for the rows of the first movies (by movie_id) of the 15,000 smallest
    review_id, until ``limit`` rows.
    """
    import duckdb

    con = duckdb.connect()
    table = con.sql(f"""
        WITH w1 AS (SELECT * FROM '{DATA}/movie_reviews.parquet' ORDER BY review_id
                    LIMIT 15000)
        SELECT {', '.join(W1_FIELDS)} FROM w1 ORDER BY movie_id, review_id""").fetchall()
    rows = [tuple("" if v is None else str(v) for v in r) for r in table][:limit]
    return {f: [r[j] for r in rows] for j, f in enumerate(W1_FIELDS)}


def call_of(instruction: str, kind: CallKind, max_tokens: int | None) -> LLMCall:
    return LLMCall(
        id="w1", kind=kind, template=PromptTemplate.parse(instruction, list(W1_FIELDS)),
        fields=tuple(Field(n, exp.column(n)) for n in W1_FIELDS),
        options=CallOptions(max_tokens=max_tokens), input=exp.select("1"), lookup="w1",
        text="LLM(...)", clause="SELECT")


def shape_of(model: nn.Module) -> MoEShape:
    c = model.config
    return MoEShape(moe_layers=c.num_hidden_layers, experts=c.num_experts,
                    top_k=c.num_experts_per_tok, hidden=c.hidden_size,
                    intermediate=c.intermediate_size, dtype_bytes=4)


def tokenize(text: str) -> list[int]:
    return list(text.encode("utf-8"))


# ---- per-row decode routing (the truth the signatures are scored against) ----------------


class _DecodeRecorder(nn.Module):
    def __init__(self, inner: nn.Module, position: int, sink: list[set[int]],
                 experts: int) -> None:
        super().__init__()
        self.inner, self.position, self.sink, self.experts = inner, position, sink, experts

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if hidden.shape[0] == 1:  # one row alone: a decode step has one token
            self.sink[-1].update(self.position * self.experts + int(e)
                                 for e in top_k_index.reshape(-1).tolist())
        return self.inner(hidden, top_k_index, top_k_weights)


def decode_sets(model: nn.Module, prompts: list[list[int]], decode: int) -> list[int]:
    """Each prompt's decode experts (bit mask of layer position * E + expert), run alone."""
    model = copy.deepcopy(model)
    sink: list[set[int]] = []
    e = model.config.num_experts
    names = [n for n, _ in model.named_modules() if n.endswith(".experts")]
    position = {n: k for k, n in enumerate(names)}
    replace_experts(model, lambda name, m: _DecodeRecorder(m, position[name], sink, e))
    engine = Engine(model, eos=(SEPARATOR,), pad=0, device="cpu", batch_size=1)
    out = []
    for ids in prompts:
        sink.append(set())
        engine.run([Job(0, tuple(ids), budget=decode, ignore_eos=True)])
        out.append(sum(1 << b for b in sink[-1]))
    return out


# ---- the orders ---------------------------------------------------------------------------


def engine_steps(sends: list[list[int]], ids: list[list[int]], step: int) -> list[list[int]]:
    """The engine's steps: each send sorted by token ids (then index) and cut every ``step``."""
    out = []
    for send in sends:
        ordered = sorted(range(len(send)), key=lambda k: (ids[send[k]], k))
        rows = [send[k] for k in ordered]
        out += [rows[i:i + step] for i in range(0, len(rows), step)]
    return out


def sends_of(batch: PromptBatch) -> list[list[int]]:
    order = list(batch.send_order())
    edges = [*batch.batches, len(order)] if batch.batches else [0, len(order)]
    return [order[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a]


def union_cost(steps: list[list[int]], sets: dict[int, int]) -> float:
    """Mean distinct (layer, expert) pairs per step."""
    total = 0
    for s in steps:
        u = 0
        for r in s:
            u |= sets[r]
        total += u.bit_count()
    return total / max(len(steps), 1)


def oracle_sends(base: PromptBatch, truth: dict[int, int], step: int) -> list[list[int]]:
    """:func:`order_rows` over the prefix groups with the given per-row experts (each row's
    actual decode experts: the oracle order; its table signature: the rule's order before
    its minimum-saving gate)."""
    order = list(base.send_order())
    prompts = [base.prompt(i) for i in order]
    groups = [[order[p] for p in g] for g in flat_groups(prompts)]
    chosen = order_rows(groups, [truth.get(i, 0) for i in range(base.n_rows)], batch_size=step)
    return [chosen[i:i + step] for i in range(0, len(chosen), step)]


# ---- measured runs ------------------------------------------------------------------------


class _ByKind:
    """Engine step hook: the offload counters' change over each forward pass, by kind."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self.by_kind: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def step(self, kind: str, new: torch.Tensor, full: torch.Tensor) -> Any:
        before = self.runtime.stats()
        yield
        after = self.runtime.stats()
        acc = self.by_kind.setdefault("decode" if kind == "decode" else "prefill",
                                      {"needed": 0, "hits": 0, "bytes_h2d": 0, "passes": 0})
        for name in ("needed", "hits", "bytes_h2d"):
            acc[name] += getattr(after, name) - getattr(before, name)
        acc["passes"] += 1


def run_offloaded(model: nn.Module, sends: list[list[int]], ids: list[list[int]], *,
                  share: float, step: int, decode: int) -> dict[str, Any]:
    """Run the sends through the engine with the experts offloaded (plan lru)."""
    m = copy.deepcopy(model)
    runtime = offload_experts(m, MoEOptions(expert_cache=share, plan="lru"), device="cpu")
    hook = _ByKind(runtime)
    engine = Engine(m, eos=(SEPARATOR,), pad=0, device="cpu", batch_size=step, timer=hook)
    t0 = time.perf_counter()
    try:
        for send in sends:
            engine.run([Job(k, tuple(ids[r]), budget=decode, ignore_eos=True)
                        for k, r in enumerate(send)])
        total = runtime.stats()
    finally:
        runtime.close()
    out: dict[str, Any] = {"seconds": round(time.perf_counter() - t0, 2),
                           "hit_rate": round(total.hit_rate, 4), "needed": total.needed,
                           "bytes_h2d": total.bytes_h2d}
    for kind, acc in hook.by_kind.items():
        out[f"{kind}_hit_rate"] = round(acc["hits"] / acc["needed"], 4) if acc["needed"] else 0
        out[f"{kind}_needed"] = int(acc["needed"])
        out[f"{kind}_bytes_h2d"] = int(acc["bytes_h2d"])
    return out


# ---- main ---------------------------------------------------------------------------------


def train(args: argparse.Namespace) -> tuple[nn.Module, Any, dict[str, Any]]:
    texts = read_texts(DATA / "reviews.parquet", "review", limit=args.texts)
    ids = text_token_ids(texts)
    split = int(len(ids) * 0.8)
    cfg = tiny_moe_config(BYTE_VOCAB_SIZE, layers=4, experts=32, top_k=4, hidden=128,
                          intermediate=128, heads=4, max_positions=4096)
    t0 = time.perf_counter()
    model = train_tiny_moe(ids[:split], cfg, steps=args.steps, batch_rows=16, seq_len=128)
    train_s = time.perf_counter() - t0
    held = [x[:256] for x in ids[split:] if len(x) >= 16]
    loss = lm_loss(model, held[:200])
    trace = record_routing(model, [held[i:i + 32] for i in range(0, len(held), 32)],
                           max_tokens=200_000)
    table = routing_table(trace)
    info = {"train_steps": args.steps, "train_s": round(train_s, 1),
            "heldout_loss": round(loss, 3), "trace_tokens": trace.num_tokens,
            "table_tokens": len(table.experts)}
    return model, table, info


def signature_quality(table: Any, prompts: list[str], truth: dict[int, int], order: list[int],
                      base_steps: dict[int, list[list[int]]], base: PromptBatch,
                      ) -> list[dict[str, Any]]:
    """Per signature length: precision/recall against the decode experts, and the actual
    experts per step of the order it gives (vs the prefix-group order and the oracle).
    """
    out = []
    rows = list(range(len(prompts)))
    for n in SIGNATURE_SWEEP:
        sigs = {i: signature(table, tokenize(prompts[i])[-n:] if n else tokenize(prompts[i]))
                for i in rows}
        tp = sum((sigs[i] & truth[i]).bit_count() for i in rows)
        precision = tp / max(sum(sigs[i].bit_count() for i in rows), 1)
        recall = tp / max(sum(truth[i].bit_count() for i in rows), 1)
        shuffled = rows[:]
        random.Random(0).shuffle(shuffled)
        chance = sum((sigs[a] & truth[b]).bit_count() for a, b in zip(rows, shuffled, strict=True)
                     ) / max(sum(sigs[i].bit_count() for i in rows), 1)
        entry: dict[str, Any] = {"tokens": n or "all", "precision": round(precision, 3),
                                 "recall": round(recall, 3),
                                 "precision_other_row": round(chance, 3)}
        groups = [[order[p] for p in g] for g in flat_groups([base.prompt(i) for i in order])]
        for step, steps in base_steps.items():
            chosen = order_rows(groups, [sigs[i] for i in rows], batch_size=step)
            mine = [chosen[i:i + step] for i in range(0, len(chosen), step)]
            entry[f"actual_experts_per_step_b{step}"] = round(union_cost(mine, truth), 1)
            entry[f"baseline_experts_per_step_b{step}"] = round(union_cost(steps, truth), 1)
        out.append(entry)
    return out


def report(result: dict[str, Any]) -> str:
    """The measured tables as markdown (the analysis is written beside them by hand)."""
    t = result["training"]
    lines = [
        f"Machine: {result['machine']}, torch {result['torch']}, {result['threads']} CPU thread. "
        f"Tiny MoE {result['shape']}: {t['train_steps']} training steps ({t['train_s']} s), "
        f"held-out loss {t['heldout_loss']}; routing table of {t['table_tokens']} token ids "
        f"from {t['trace_tokens']:,} traced tokens. {result['rows']} W1 rows "
        f"({result['prefix_groups']} prefix groups, {result['prompt_tokens_mean']} tokens a "
        f"prompt), {result['decode_tokens']} decoded tokens a row.", "",
        "Signature (the table's experts for the last N prompt tokens) against the experts the "
        "row's own decode steps use (run alone), and the decode working set of a step (the "
        "distinct (layer, expert) its rows' decode uses, of "
        f"{result['shape']['layers'] * result['shape']['experts']}) in the order each N "
        "gives (the prefix-group order's in brackets):", "",
    ]
    sig = result["signatures"]
    steps = sorted({int(k.rsplit("_b", 1)[1]) for k in sig[0] if k.startswith("actual_")})
    head = "| N | precision | recall | precision vs another row | " + " | ".join(
        f"working set at {b} rows/step" for b in steps) + " |"
    lines += [head, "|" + "---|" * (4 + len(steps))]
    for e in sig:
        cells = [f"{e[f'actual_experts_per_step_b{b}']} ({e[f'baseline_experts_per_step_b{b}']})"
                 for b in steps]
        lines.append(f"| {e['tokens']} | {e['precision']:.0%} | {e['recall']:.0%} | "
                     f"{e['precision_other_row']:.0%} | " + " | ".join(cells) + " |")
    lines += ["", "Runs through the offload runtime (plan lru, CPU): hit rate = share of the "
              "needed experts resident when their layer ran (`ExpertOffload.stats()`), split "
              "by forward pass; MB moved host-to-device:", "",
              "| cache | rows/step | order | predicted working set | actual decode working "
              "set | decode hit rate | prefill hit rate | all | decode MB | all MB | s |",
              "|" + "---|" * 11]
    for r in result["runs"]:
        lines.append(
            f"| {r['cache_share']:.0%} | {r['rows_per_step']} | {r['order']} | "
            f"{r['predicted_experts_per_step']} | {r['actual_decode_experts_per_step']} | "
            f"{r.get('decode_hit_rate', 0):.1%} | {r.get('prefill_hit_rate', 0):.1%} | "
            f"{r['hit_rate']:.1%} | {r.get('decode_bytes_h2d', 0) / 1e6:.1f} | "
            f"{r['bytes_h2d'] / 1e6:.1f} | "
            + (f"(as {r['same_steps_as']}) |" if r.get("same_steps_as") else f"{r['seconds']} |"))
    notes = {r["rule_note"] for r in result["runs"] if r.get("rule_note")}
    filters = {r["filter_note"] for r in result["runs"] if r.get("filter_note")}
    lines += ["", "What the rule said (EXPLAIN's line):", "",
              *(f"- `{n}`" for n in sorted(notes)),
              *(f"- W1's LLM_FILTER: `{n}`" for n in sorted(filters))]
    return "\n".join(lines) + "\n"


def main() -> None:  # noqa: PLR0915 - one straight measurement script
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--steps", type=int, default=400, help="training steps")
    ap.add_argument("--texts", type=int, default=20000)
    ap.add_argument("--shares", default="0.25,0.4")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--report", type=Path, help="only write the tables of this JSON result")
    args = ap.parse_args()
    if args.report is not None:
        print(report(json.loads(args.report.read_text())), end="")
        return
    if args.smoke:
        args.rows, args.decode, args.steps, args.texts = 24, 3, 5, 400
        args.shares, args.batches = "0.4", "1,4"
    torch.set_num_threads(1)
    torch.manual_seed(0)
    result: dict[str, Any] = {"machine": platform.processor() or platform.machine(),
                              "torch": torch.__version__, "threads": 1, "rows": args.rows,
                              "decode_tokens": args.decode}
    model, table, result["training"] = train(args)
    shape = shape_of(model)
    result["shape"] = {"layers": shape.moe_layers, "experts": shape.experts,
                       "top_k": shape.top_k, "hidden": shape.hidden}
    columns = w1_rows(args.rows)
    n = len(columns["review"])
    values = tuple(tuple(columns[f]) for f in W1_FIELDS)
    batch0 = PromptBatch(call=call_of(INSTRUCTION, CallKind.MAP, args.decode), values=values,
                         n_rows=n)
    base_rules = tuple(r for r in RULES if r is not expert_order)
    base, _ = optimize(batch0, RuleContext(capabilities=CAPS, batch_size=EXECUTOR_BATCH),
                       rules=base_rules)
    prompts = base.prompts(range(n))
    ids = [tokenize(p) for p in prompts]
    result["prompt_tokens_mean"] = round(sum(map(len, ids)) / n, 1)
    result["prefix_groups"] = len(flat_groups([prompts[i] for i in base.send_order()]))
    t0 = time.perf_counter()
    truth_list = decode_sets(model, ids, args.decode)
    truth = dict(enumerate(truth_list))
    result["decode_truth_s"] = round(time.perf_counter() - t0, 1)
    steps_list = [int(b) for b in args.batches.split(",")]
    base_steps = {b: engine_steps(sends_of(base), ids, b) for b in steps_list}
    result["signatures"] = signature_quality(table, prompts, truth, list(base.send_order()),
                                             base_steps, base)
    # what the rule says for W1's own filter (scored choices, not decoded)
    filt = PromptBatch(call=call_of(FILTER, CallKind.FILTER, None), values=values, n_rows=n)
    sigs = {i: signature(table, tokenize(p)[-SIGNATURE_TOKENS:]) for i, p in enumerate(prompts)}
    runs = []
    for share in (float(s) for s in args.shares.split(",")):
        for step in steps_list:
            routing = ExpertRouting(shape, slots_for(shape, share), step, table, "bench",
                                    tokenize=tokenize, plan="lru")
            ctx = RuleContext(capabilities=CAPS, batch_size=EXECUTOR_BATCH,
                              experts=lambda _m, r=routing: r)
            mine, _ = optimize(batch0, ctx)
            note = next((x for x in mine.notes if x.startswith("expert_order")), "")
            filt_note = next((x for x in optimize(filt, ctx)[0].notes
                              if x.startswith("expert_order")), "")
            variants = {"prefix_group_order": base_steps[step],
                        "table_order": oracle_sends(base, sigs, step),
                        "expert_order": engine_steps(sends_of(mine), ids, step),
                        "oracle_order": oracle_sends(base, truth, step)}
            done: dict[str, dict[str, Any]] = {}
            for name, steps in variants.items():
                same = next((k for k, v in variants.items() if k in done and v == steps), None)
                measured = ({**done[same], "same_steps_as": same} if same is not None else
                            run_offloaded(model, steps, ids, share=share, step=step,
                                          decode=args.decode))
                done[name] = {k: v for k, v in measured.items() if k != "same_steps_as"}
                run = {"cache_share": share, "rows_per_step": step, "order": name,
                       "predicted_experts_per_step": round(union_cost(steps, sigs), 1),
                       "actual_decode_experts_per_step": round(union_cost(steps, truth), 1),
                       **measured}
                if name == "expert_order":
                    run["rule_note"] = note
                    run["filter_note"] = filt_note
                print(json.dumps(run), flush=True)
                runs.append(run)
    result["runs"] = runs
    args.out.mkdir(parents=True, exist_ok=True)
    name = "moe_row_order_smoke" if args.smoke else "moe_row_order"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(report(result), end="")  # bench/results/moe_row_order.md holds these with notes


if __name__ == "__main__":
    main()
