"""MoE expert offload on one GPU (issue 15): speed by plan and predictor, and predictor accuracy.

Random weights make routing nearly uniform and unpredictable, so speed and routing are
measured apart (as the issue asks):

1. **Speed** on Mixtral-8x7B (16 of its 32 layers, so that host memory holds the pinned
   experts twice over), Qwen1.5-MoE-A2.7B and OLMoE-1B-7B shapes, random bf16 weights, a GPU
   expert budget of 40% of the experts; decode at batch 1, 8 and 256 after a 32-token
   prefill. Runs, in one process on one model: all experts on the GPU (the upper bound),
   reactive LRU, ``predictive`` with the next-router predictor, ``predictive`` with the
   oracle at error rates 0-50% (controlled accuracy) and at the learned predictor's measured
   accuracy, ``layer_sweep``, ``auto``, and accelerate's CPU offload of the experts modules
   (``accelerate.cpu_offload`` per layer: the whole layer's experts move at every forward;
   given our pinned host tensors, which makes it faster than its default pageable copy).
2. **Routing**: a tiny OLMoE-shape MoE (8 layers, 16 experts, top-2, hidden 512) is trained in
   the run on real review text (token ids cut from ../shared/datasets' rotten_tomatoes
   movie_reviews by ``--tokens``), its routing is recorded on held-out text, the learned
   predictor is trained on it, and held-out precision is measured against the next-router
   baseline and chance.

vLLM's ``cpu_offload_gb`` is not run: the GPU machine's vLLM 0.26 bundle has no MoE kernels.

The GPU machine has torch and transformers but not llmsql's SQL dependencies (duckdb,
sqlglot, pyarrow), so this script imports the engine without running ``llmsql/__init__``.

    python bench/moe_offload.py --models olmoe,qwen --tiny --tokens .gpu_data/review_tokens.pt \
        --out $OUT
    python bench/moe_offload.py --models mixtral --accuracy 0.6 --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if "llmsql" not in sys.modules:  # the engine alone: no duckdb / sqlglot / pyarrow needed
    _pkg = types.ModuleType("llmsql")
    _pkg.__path__ = [str(ROOT / "llmsql")]
    sys.modules["llmsql"] = _pkg

import torch  # noqa: E402

from llmsql.engine.moe import NextRouter, NoPredictor, Oracle, offload_experts  # noqa: E402
from llmsql.engine.moe.predictors import routers_of  # noqa: E402
from llmsql.moe import MoEOptions  # noqa: E402
from llmsql.moe.plan import Hardware, MoEShape, pcie_floor_seconds, slots_for  # noqa: E402

DEVICE = "cuda"
"""``--smoke`` runs the whole script on the CPU with tiny shapes (checks it, measures nothing)."""
CACHE_SHARE = 0.4
PROMPT = 32
STEPS = {1: 16, 8: 12, 256: 6}
ERRORS = (0.0, 0.1, 0.2, 0.3, 0.5)
QUICK_ERRORS = (0.0, 0.2, 0.5)
BATCHES = (1, 8, 256)
AUTO_WARM = 10
"""Untimed decode steps before ``auto`` is timed: its trials of 3 plans x (2 counted + 1)."""


def configs() -> dict[str, Any]:
    import transformers as tf

    return {
        "olmoe": tf.OlmoeConfig(vocab_size=50304, hidden_size=2048, intermediate_size=1024,
                                num_hidden_layers=16, num_attention_heads=16,
                                num_key_value_heads=16, num_experts=64, num_experts_per_tok=8),
        "qwen": tf.Qwen2MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                                  moe_intermediate_size=1408,
                                  shared_expert_intermediate_size=5632, num_hidden_layers=24,
                                  num_attention_heads=16, num_key_value_heads=16,
                                  num_experts=60, num_experts_per_tok=4),
        "mixtral": tf.MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                    num_hidden_layers=16, num_attention_heads=32,
                                    num_key_value_heads=8, num_local_experts=8,
                                    num_experts_per_tok=2),
    }


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def smoke_configs() -> dict[str, Any]:
    small = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
             "vocab_size": 300}
    out = {}
    for name, cfg in configs().items():
        for k, v in small.items():
            setattr(cfg, k, v)
        cfg.num_key_value_heads = 4
        cfg.intermediate_size = 64
        if hasattr(cfg, "moe_intermediate_size"):
            cfg.moe_intermediate_size = 32
            cfg.shared_expert_intermediate_size = 32
        out[name] = cfg
    return out


def build(name: str, seed: int = 0) -> Any:
    from transformers import AutoModelForCausalLM

    cfg = (configs() if DEVICE == "cuda" else smoke_configs())[name]
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(
            cfg, dtype=torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    return model.eval()


def h2d_rate() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, pin_memory=DEVICE == "cuda")
    dst = torch.empty(2**30, dtype=torch.uint8, device=DEVICE)
    dst.copy_(src, non_blocking=True)
    sync()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync()
        times.append(time.perf_counter() - t)
    return 2**30 / sorted(times)[2]


SAMPLE = False
"""``--sample``: sample each next token (random weights under greedy decoding repeat one
token, so every step routes alike and any cache hits; sampling keeps routing varied)."""


def pick(logits: Any, gen: Any) -> Any:
    if not SAMPLE:
        return logits.argmax(-1, keepdim=True)
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, 1, generator=gen)


def decode(model: Any, batch: int, steps: int, seed: int = 1,
           after_prefill: Any = None, warm: int = 0) -> dict[str, float]:
    """Prefill ``PROMPT`` tokens per row, then ``warm`` untimed decode steps (``auto``'s
    plan trials), then ``steps`` timed decode steps (``after_prefill()`` runs before them,
    untimed)."""
    from transformers import DynamicCache

    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, PROMPT), device=DEVICE,
                        generator=gen)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        prefill_s = time.perf_counter() - t0
        t_warm = time.perf_counter()
        for _ in range(warm):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = pick(out.logits[:, -1], gen)
        sync()
        t_warm = time.perf_counter() - t_warm
        if after_prefill is not None:
            after_prefill()
        t1 = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = pick(out.logits[:, -1], gen)
        sync()
        t2 = time.perf_counter()
    return {"prefill_s": prefill_s, "prefill_tok_s": batch * PROMPT / prefill_s,
            "warm_steps": warm, "warm_s": t_warm,
            "decode_s": t2 - t1, "decode_step_s": (t2 - t1) / steps,
            "decode_tok_s": batch * steps / (t2 - t1)}


def experts_modules(model: Any) -> dict[str, Any]:
    from llmsql.engine.experts import find_experts

    return dict(find_experts(model))


def host_slabs(model: Any, originals: dict[str, Any]) -> dict[int, tuple[Any, Any]]:
    from llmsql.engine.moe import moe_layer_index

    out = {}
    for name, mod in originals.items():
        pin = DEVICE == "cuda"
        gu = torch.empty(mod.gate_up_proj.shape, dtype=mod.gate_up_proj.dtype, pin_memory=pin)
        dn = torch.empty(mod.down_proj.shape, dtype=mod.down_proj.dtype, pin_memory=pin)
        gu.copy_(mod.gate_up_proj.detach())
        dn.copy_(mod.down_proj.detach())
        out[moe_layer_index(name)] = (gu, dn)
    return out


def restore(model: Any, originals: dict[str, Any]) -> None:
    for name, mod in originals.items():
        model.set_submodule(name, mod)


def run_offload(model: Any, originals: dict[str, Any], slabs: Any, hw: Hardware, *,
                plan: str, predictor: Any, batch: int, steps: int, log: bool = False,
                warm: int = 0) -> tuple[dict[str, Any], Any]:
    restore(model, originals)
    opts = MoEOptions(expert_cache=CACHE_SHARE, plan=plan,
                      predictor="none" if isinstance(predictor, NoPredictor) else "auto")
    rt = offload_experts(model, opts, device=DEVICE, host=slabs, predictor=predictor,
                         hardware=hw)
    if log:
        rt.route_log = []
    prefill: dict[str, Any] = {}

    def split() -> None:  # the figures below are the decode steps'
        s = rt.stats()
        prefill.update(prefill_hit_rate=s.hit_rate, prefill_gb_h2d=s.bytes_h2d / 1e9)
        rt.reset_stats()

    try:
        timing = decode(model, batch, steps, after_prefill=split, warm=warm)
        stats = rt.stats()
        row = {**timing, **prefill, "hit_rate": stats.hit_rate, "prefetched": stats.prefetched,
               "prefetch_precision": stats.prefetch_precision, "gb_h2d": stats.bytes_h2d / 1e9,
               "wait_s": stats.wait_seconds, "plans": dict(stats.plans), "slots": rt.slots}
        return row, rt.route_log
    finally:
        rt.close()
        restore(model, originals)
        torch.cuda.empty_cache()


def check(model: Any, originals: dict[str, Any], slabs: Any, hw: Hardware,
          predictor: Any) -> dict[str, Any]:
    """Offloaded logits against the stock model's on the same input (bf16 on the GPU)."""
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    ids = torch.randint(3, model.config.vocab_size, (4, 24), device=DEVICE, generator=gen)
    restore(model, originals)
    with torch.no_grad():
        want = model(ids).logits.float()
    rt = offload_experts(model, MoEOptions(expert_cache=CACHE_SHARE, plan="predictive"),
                         device=DEVICE, host=slabs, predictor=predictor, hardware=hw)
    try:
        with torch.no_grad():
            got = model(ids).logits.float()
    finally:
        rt.close()
        restore(model, originals)
    rel = ((got - want).norm() / want.norm()).item()
    same = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    return {"rel_err": rel, "same_argmax": same}


def run_accelerate(model: Any, originals: dict[str, Any], slabs: Any, batch: int,
                   steps: int) -> dict[str, Any]:
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    from llmsql.engine.moe import moe_layer_index

    restore(model, originals)
    for name, mod in originals.items():
        gu, dn = slabs[moe_layer_index(name)]
        cpu_offload(mod, execution_device=torch.device(DEVICE),
                    state_dict={"gate_up_proj": gu, "down_proj": dn})
    try:
        return decode(model, batch, steps)
    finally:
        for mod in originals.values():
            remove_hook_from_module(mod)


def speed(name: str, accuracy: float | None, quick: bool, out: Path) -> list[dict[str, Any]]:
    t0 = time.perf_counter()
    model = build(name)
    originals = experts_modules(model)
    shape = dataclasses.replace(MoEShape.from_config(model.config), dtype_bytes=2)
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        row = {"model": name, **row}
        rows.append(row)
        with (out / "moe_offload.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                          for k, v in row.items()}), flush=True)

    rate = h2d_rate()
    emit({"run": "setup", "build_s": time.perf_counter() - t0, "h2d_gb_s": rate / 1e9,
          "expert_gb": shape.total_expert_bytes / 1e9, "experts": shape.total_experts})
    # all resident (upper bound); its batch-1 step time calibrates the per-layer overhead
    decode(model, 1, 2)
    resident = {}
    for batch in [b for b in STEPS if b in BATCHES or b == 1]:
        resident[batch] = decode(model, batch, STEPS[batch])
        emit({"run": "all_resident", "batch": batch, "sample": SAMPLE, **resident[batch]})
    layers = model.config.num_hidden_layers
    hw = Hardware(h2d_bytes_per_s=rate,
                  layer_overhead_s=resident[1]["decode_step_s"] / layers)
    slabs = host_slabs(model, originals)
    routers = routers_of(model, sorted(slabs))
    top_k = shape.top_k
    emit({"run": "check", **check(model, originals, slabs, hw, NextRouter(routers, top_k))})
    slots = slots_for(shape, CACHE_SHARE)
    for batch, steps in STEPS.items():
        if batch not in BATCHES:
            continue
        common = {"batch": batch, "steps": steps, "sample": SAMPLE}
        row, log = run_offload(model, originals, slabs, hw, plan="lru",
                               predictor=NoPredictor(), batch=batch, steps=steps, log=True)
        emit({"run": "lru", **common, **row})
        row, _ = run_offload(model, originals, slabs, hw, plan="predictive",
                             predictor=NextRouter(routers, top_k), batch=batch, steps=steps)
        emit({"run": "predictive/next_router", **common, **row})
        errors = list((QUICK_ERRORS if quick else ERRORS) if batch < 256 else (0.0,))
        if accuracy is not None:
            errors.append(round(1 - accuracy, 3))
        for err in errors:
            oracle = Oracle(log, num_experts=shape.experts, error_rate=err)
            row, _ = run_offload(model, originals, slabs, hw, plan="predictive",
                                 predictor=oracle, batch=batch, steps=steps)
            emit({"run": f"predictive/oracle_err{err}", **common, **row})
        row, _ = run_offload(model, originals, slabs, hw, plan="layer_sweep",
                             predictor=NoPredictor(), batch=batch, steps=steps)
        emit({"run": "layer_sweep", **common, **row})
        # auto's plan trials (each candidate a few steps) run untimed first: a batch run
        # takes thousands of steps, so the steady state is what it pays
        row, _ = run_offload(model, originals, slabs, hw, plan="auto",
                             predictor=NextRouter(routers, top_k), batch=batch, steps=steps,
                             warm=AUTO_WARM)
        floor = pcie_floor_seconds(shape, slots=slots, tokens=batch, hw=hw)
        emit({"run": "auto", **common, **row, "floor_step_s": floor})
        acc_steps = 2 if quick else 4
        emit({"run": "accelerate", "batch": batch, "steps": acc_steps, "sample": SAMPLE,
              **run_accelerate(model, originals, slabs, batch, acc_steps)})
    del model, originals, slabs
    torch.cuda.empty_cache()
    return rows


def routing(tokens: Path, out: Path, minutes: float) -> dict[str, Any]:
    from llmsql.engine.moe.learned import train_predictor
    from llmsql.engine.moe.tiny import tiny_moe_config, train_tiny_moe
    from llmsql.engine.moe.trace import record_routing

    data = torch.load(tokens)
    ids = [t.tolist() for t in data["ids"]]
    split = int(len(ids) * 0.9)
    cfg = tiny_moe_config(data["vocab_size"], layers=8, experts=16, top_k=2, hidden=512,
                          intermediate=1024, heads=8)
    t0 = time.perf_counter()
    steps = 1200 if minutes >= 3 else 400
    if DEVICE == "cpu":
        cfg = tiny_moe_config(data["vocab_size"], layers=3, experts=8, top_k=2, hidden=64,
                              intermediate=64, heads=4)
        steps, ids = 20, ids[:2000]
        split = int(len(ids) * 0.9)
    model = train_tiny_moe(ids[:split], cfg, steps=steps, batch_rows=32, seq_len=128,
                           device=DEVICE)
    train_s = time.perf_counter() - t0
    held = [x[:128] for x in ids[split:] if len(x) >= 8][:3000]
    batches = [held[i:i + 64] for i in range(0, len(held), 64)]
    trace = record_routing(model, batches, max_tokens=120_000)
    routers = routers_of(model, trace.layers)
    predictor, metrics = train_predictor(trace, lookahead=2, device=DEVICE, routers=routers)
    result = {"run": "routing", "source": data["source"], "train_steps": steps,
              "train_s": train_s, "trace_tokens": trace.num_tokens,
              "metrics": metrics.to_dict()}
    with (out / "moe_routing.json").open("w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result), flush=True)
    del predictor
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="olmoe,qwen,mixtral")
    ap.add_argument("--tiny", action="store_true", help="train the tiny MoE and the predictor")
    ap.add_argument("--tokens", type=Path, default=ROOT / ".gpu_data" / "review_tokens.pt")
    ap.add_argument("--accuracy", type=float, default=None,
                    help="the learned predictor's precision (else measured with --tiny)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: a check")
    ap.add_argument("--sample", action="store_true", help="sample tokens instead of greedy")
    ap.add_argument("--batches", default="1,8,256")
    ap.add_argument("--errors", default=None, help="oracle error rates, e.g. 0,0.2")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    global DEVICE, SAMPLE, BATCHES, QUICK_ERRORS
    SAMPLE = args.sample
    BATCHES = tuple(int(b) for b in args.batches.split(","))
    if args.errors is not None:
        QUICK_ERRORS = tuple(float(e) for e in args.errors.split(",") if e)
    if args.smoke:
        DEVICE = "cpu"
        STEPS.update({1: 2, 8: 2, 256: 1})
    elif args.quick:
        STEPS.update({1: 12, 8: 8, 256: 4})
    env = {"run": "env", "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
           "python": platform.python_version()}
    import transformers

    env["transformers"] = transformers.__version__
    print(json.dumps(env), flush=True)
    with (args.out / "moe_offload.jsonl").open("a") as f:
        f.write(json.dumps(env) + "\n")
    accuracy = args.accuracy
    if args.tiny:
        metrics = routing(args.tokens, args.out, 1.0 if args.quick else 3.0)["metrics"]
        accuracy = metrics["distances"][0]["precision"]
    for name in [m for m in args.models.split(",") if m]:
        speed(name, accuracy, args.quick, args.out)


if __name__ == "__main__":
    main()
