"""Where a decode step's time goes with MoE experts on the GPU and offloaded (issue 15).

Profiles one batch-1 and one batch-8 decode step of the OLMoE-1B-7B shape (random bf16
weights): all experts resident under transformers' ``grouped_mm`` and ``eager`` experts, and
offloaded (``lru``); and host-to-device copy rates for one large copy versus per-expert
copies. Prints torch profiler tables (top operators by self CPU and by CUDA time).

    python bench/moe_step_profile.py --out $OUT        # GPU
    python bench/moe_step_profile.py --smoke           # CPU, tiny shape: a check
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_offload as mo  # noqa: E402  (sets up the engine-only import)
import torch  # noqa: E402

from llmsql.moe import MoEOptions  # noqa: E402


def step_times(model, batch: int, steps: int = 6) -> float:
    return mo.decode(model, batch, steps)["decode_step_s"]


def profile(model, batch: int, label: str, out: Path | None) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if mo.DEVICE == "cuda" else [])
    with prof(activities=acts) as p:
        mo.decode(model, batch, 2)
    cpu = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
    text = f"## {label} batch {batch}\n\n### by self CPU\n{cpu}\n"
    if mo.DEVICE == "cuda":
        text += "### by CUDA\n" + p.key_averages().table(sort_by="self_cuda_time_total",
                                                        row_limit=12) + "\n"
    print(text, flush=True)
    if out is not None:
        with (out / "moe_step_profile.txt").open("a") as f:
            f.write(text)


def copy_rates(shape) -> dict[str, float]:
    """GB/s: one 1 GiB copy; 64 expert copies issued in a loop; the same as one cat'd copy."""
    dev = mo.DEVICE
    pin = dev == "cuda"
    n = 64
    gu = torch.empty((n, 2 * shape.intermediate, shape.hidden), dtype=torch.bfloat16,
                     pin_memory=pin)
    dn = torch.empty((n, shape.hidden, shape.intermediate), dtype=torch.bfloat16,
                     pin_memory=pin)
    dgu, ddn = torch.empty_like(gu, device=dev), torch.empty_like(dn, device=dev)
    s = torch.cuda.Stream() if pin else None
    out = {}

    def timed(fn) -> float:
        fn()
        mo.sync()
        t = time.perf_counter()
        for _ in range(3):
            fn()
        mo.sync()
        return 3 * (gu.numel() + dn.numel()) * 2 / (time.perf_counter() - t) / 1e9

    def bulk():
        dgu.copy_(gu, non_blocking=True)
        ddn.copy_(dn, non_blocking=True)

    def per_expert():
        for e in range(n):
            dgu[e].copy_(gu[e], non_blocking=True)
            ddn[e].copy_(dn[e], non_blocking=True)

    def per_expert_stream():
        with torch.cuda.stream(s):
            for e in range(n):
                dgu[e].copy_(gu[e], non_blocking=True)
                ddn[e].copy_(dn[e], non_blocking=True)
        torch.cuda.current_stream().wait_stream(s)

    out["bulk_gb_s"] = timed(bulk)
    out["per_expert_gb_s"] = timed(per_expert)
    if s is not None:
        out["per_expert_side_stream_gb_s"] = timed(per_expert_stream)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.smoke:
        mo.DEVICE = "cpu"
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    model = mo.build("olmoe")
    import dataclasses

    from llmsql.moe.plan import MoEShape

    shape = dataclasses.replace(MoEShape.from_config(model.config), dtype_bytes=2)
    res = {"gpu": torch.cuda.get_device_name() if mo.DEVICE == "cuda" else "cpu"}
    res.update(copy_rates(shape))
    print(json.dumps(res), flush=True)
    for impl in ("grouped_mm", "eager"):
        model.set_experts_implementation(impl)
        for b in (1, 8):
            step_times(model, b, 2)
            res[f"resident_{impl}_b{b}_ms"] = 1e3 * step_times(model, b)
        print(json.dumps(res), flush=True)
    model.set_experts_implementation("grouped_mm")
    profile(model, 1, "resident grouped_mm", args.out)
    originals = mo.experts_modules(model)
    slabs = mo.host_slabs(model, originals)
    from llmsql.engine.moe import NoPredictor, offload_experts

    for plan in ("lru", "layer_sweep"):
        rt = offload_experts(model, MoEOptions(expert_cache=0.4, plan=plan), device=mo.DEVICE,
                             host=slabs, predictor=NoPredictor())
        try:
            for b in (1, 8):
                step_times(model, b, 2)
                res[f"{plan}_b{b}_ms"] = 1e3 * step_times(model, b)
            profile(model, 8 if plan == "lru" else 1, plan, args.out)
        finally:
            rt.close()
            mo.restore(model, originals)
        print(json.dumps(res), flush=True)
    if args.out:
        (args.out / "moe_step_profile.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
