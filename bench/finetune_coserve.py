"""LoRA fine-tuning co-served with inference on one GPU (issue 16, after FlexLLM).

Random-init Llama shapes (``1b``: Llama-3.2-1B-like, hidden 2048, 16 layers, 32 heads, 8 KV
heads, FFN 8192, vocab 32000, tied embeddings; ``8b``: Llama-3-8B, hidden 4096, 32 layers,
FFN 14336, vocab 128256), bf16 on CUDA, LoRA r=16 (alpha 32) on q_proj and v_proj (PEFT
where installed, else the engine's adapters: the GPU image has no PEFT).

Inference: one stream alternating a **W1-shaped LLM_FILTER batch** (16 rows in groups of 8
sharing a ~190-300-token prefix (instruction, synopsis, genre, director), then a 40-120-token
review; two constrained choices, Yes/No, scored) and a **W3-shaped generation batch** (8 rows
in groups of 4 sharing a ~140-260-token context, a 8-20-token question, 16 generated tokens).
Fine-tuning: W1-shaped labelled sequences (the prompt, then the answer token and EOS, only
those two labelled), batches of 8 sequences (gradient accumulation 8), AdamW lr 2e-4.

Modes, in one process per shape, each for ``--seconds``:

- ``inference``: inference alone (closed loop, then at each ``--loads`` below 1);
- ``finetune``: fine-tuning alone (pieces of 256 forward tokens, or every layer's backward);
- ``temporal-N``: temporal sharing: after every N inference passes, N fine-tuning
  iterations (pieces as above) run while inference waits; N in ``--intervals``;
- ``coserve``: :class:`llmsql.engine.finetune.CoServer`: after each inference pass a piece
  sized by FlexLLM's token rule and the fitted step-time model so that pass + piece stays
  under 0.9 x the objective.

At a load below 1 the batches arrive on a fixed clock at ``load`` x the closed-loop
inference-alone rate; idle time trains in the background (temporal and co-serving alike).

Objective (SLO): per workload, ``--slo-factor`` x the median time per pass of that workload's
batches in inference alone (closed loop), unless ``--slo-ms`` is given. A batch meets it when
its wall time divided by its forward passes (its mean time per iteration, what TPOT measures
for a request) is within it: ``slo_attainment``. ``pass_attainment``: the share of passes
whose own time plus the fine-tuning work right after them is within it.

Every mode attaches a step timer (each pass synchronizes the GPU), so modes compare at equal
measurement cost. Rows go to ``--out``/finetune_coserve.jsonl as each mode ends.

The GPU machine has torch and transformers but not llmsql's SQL dependencies, so this script
imports the engine without running ``llmsql/__init__`` (as bench/moe_offload.py does).

Why over 500 lines: one consolidated benchmark per feature (SEEDS.md, device limits): the
workloads, every baseline and the comparison run in one process, one GPU command.

    python bench/finetune_coserve.py --smoke --out /tmp/ftsmoke      # CPU, tiny, < 1 min
    python bench/finetune_coserve.py --quick --out $OUT               # GPU, ~4 min
    python bench/finetune_coserve.py --shapes 1b,8b --out $OUT        # GPU, ~8 min
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import sys
import time
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if "llmsql" not in sys.modules:  # the engine alone: no duckdb / sqlglot / pyarrow needed
    _pkg = types.ModuleType("llmsql")
    _pkg.__path__ = [str(ROOT / "llmsql")]
    sys.modules["llmsql"] = _pkg

import torch  # noqa: E402

from llmsql.engine import Engine, Job, StepTimer, from_config  # noqa: E402
from llmsql.engine.finetune import (  # noqa: E402
    BACKWARD,
    FORWARD,
    IGNORE,
    CoServer,
    Trainer,
    TrainSeq,
    attach_lora,
    lora_impl,
)

EOS, PAD, YES, NO = 2, 0, 31, 32
FT_ITERATION_TOKENS = 256
"""A fine-tuning iteration when fine-tuning runs alone (and in temporal sharing): a forward
piece of this many tokens, or one sequence's whole backward."""


@dataclass(frozen=True)
class Scale:
    """Token counts of the synthetic workloads (GPU, or the CPU smoke run)."""

    w1_rows: int = 16
    w1_group: int = 8
    w1_prefix: tuple[int, int] = (190, 300)
    w1_suffix: tuple[int, int] = (40, 120)
    w3_rows: int = 8
    w3_group: int = 4
    w3_prefix: tuple[int, int] = (140, 260)
    w3_suffix: tuple[int, int] = (8, 20)
    w3_budget: int = 16
    train_rows: int = 256
    train_batch: int = 8


SMOKE = Scale(w1_rows=4, w1_group=2, w1_prefix=(12, 20), w1_suffix=(4, 10), w3_rows=4,
              w3_group=2, w3_prefix=(10, 16), w3_suffix=(3, 6), w3_budget=4, train_rows=16,
              train_batch=2)


def configs(smoke: bool) -> dict[str, Any]:
    from transformers import LlamaConfig

    if smoke:
        tiny = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}
        return {"1b": LlamaConfig(**tiny), "8b": LlamaConfig(**{**tiny, "num_hidden_layers": 4})}
    common = {"num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
              "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": EOS,
              "pad_token_id": PAD}
    return {
        "1b": LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                          vocab_size=32000, tie_word_embeddings=True, **common),
        "8b": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          vocab_size=128256, tie_word_embeddings=False, **common),
    }


# ------------------------------------------------------------------------------ workloads
def _ids(rng: random.Random, count: int, vocab: int) -> tuple[int, ...]:
    return tuple(rng.randrange(40, vocab) for _ in range(count))


def w1_batch(rng: random.Random, s: Scale, vocab: int, index: int) -> list[Job]:
    """LLM_FILTER rows: groups sharing a movie prefix, a review each, Yes/No scored."""
    jobs: list[Job] = []
    while len(jobs) < s.w1_rows:
        prefix = _ids(rng, rng.randint(*s.w1_prefix), vocab)
        for _ in range(min(s.w1_group, s.w1_rows - len(jobs))):
            ids = prefix + _ids(rng, rng.randint(*s.w1_suffix), vocab)
            jobs.append(Job(index + len(jobs), ids, choices=((YES, EOS), (NO, EOS))))
    return jobs


def w3_batch(rng: random.Random, s: Scale, vocab: int, index: int) -> list[Job]:
    """RAG rows: groups sharing a context, a question each, 16 tokens generated."""
    jobs: list[Job] = []
    while len(jobs) < s.w3_rows:
        context = _ids(rng, rng.randint(*s.w3_prefix), vocab)
        for _ in range(min(s.w3_group, s.w3_rows - len(jobs))):
            ids = context + _ids(rng, rng.randint(*s.w3_suffix), vocab)
            jobs.append(Job(index + len(jobs), ids, budget=s.w3_budget, ignore_eos=True))
    return jobs


def stream(s: Scale, vocab: int, seed: int = 0) -> Any:
    """The inference stream: (workload, jobs), W1 and W3 batches alternating, forever."""
    rng = random.Random(seed)
    k = 0
    while True:
        if k % 2 == 0:
            yield "w1", w1_batch(rng, s, vocab, 0)
        else:
            yield "w3", w3_batch(rng, s, vocab, 0)
        k += 1


def train_set(s: Scale, vocab: int, seed: int = 1) -> list[TrainSeq]:
    """W1-shaped labelled rows: the prompt unlabelled, then the answer and EOS labelled."""
    rng = random.Random(seed)
    out = []
    for _ in range(s.train_rows):
        prompt = _ids(rng, rng.randint(*s.w1_prefix) + rng.randint(*s.w1_suffix), vocab)
        ids = (*prompt, rng.choice((YES, NO)), EOS)
        out.append(TrainSeq(ids, (IGNORE,) * len(prompt) + ids[-2:]))
    return out


# --------------------------------------------------------------------------- measurement
def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@dataclass
class PassLog:
    """The engine's after_pass: times each pass and what ran after it (``then``)."""

    then: Any = None
    workload: str = ""
    passes: list[tuple[str, str, float, float]] = field(default_factory=list)

    def __call__(self, step: Any) -> None:
        start = time.perf_counter()
        if self.then is not None:
            self.then(step)
        self.passes.append((self.workload, step.kind, step.seconds,
                            time.perf_counter() - start))


@dataclass
class Batch:
    workload: str
    rows: int
    tokens: int
    """Prompt tokens plus generated tokens."""
    wall: float
    passes: int


def run_stream(engine: Engine, log: PassLog, seconds: float, *, scale: Scale, vocab: int,
               interval: float, coserver: CoServer | None, slo: dict[str, float],
               more: Any = None) -> list[Batch]:
    """Run the stream for ``seconds`` (and on while ``more()`` says so, up to 3 x
    ``seconds``): batch k starts at k x ``interval`` (0: back to back)."""
    batches: list[Batch] = []
    start = time.perf_counter()

    def over() -> bool:
        elapsed = time.perf_counter() - start
        return elapsed >= 3 * seconds or (elapsed >= seconds and not (more and more()))

    for k, (workload, jobs) in enumerate(stream(scale, vocab)):
        if over():
            break
        now = time.perf_counter() - start
        if interval > 0 and k * interval > now:
            time.sleep(max(0.0, min(k * interval - now, seconds - now)))
            if over():
                break
        log.workload = workload
        if coserver is not None and workload in slo:
            coserver.set_slo_tpot_ms(slo[workload] * 1e3)
        before = len(log.passes)
        t0 = time.perf_counter()
        out = coserver.run(jobs) if coserver is not None else engine.run(jobs)
        sync()
        wall = time.perf_counter() - t0
        made = sum(len(getattr(o, "tokens", ())) for o in out)
        batches.append(Batch(workload, len(jobs), sum(len(j.ids) for j in jobs) + made, wall,
                             len(log.passes) - before))
    return batches


def summarize(batches: list[Batch], log: PassLog, slo: dict[str, float], wall: float,
              ft_tokens: int) -> dict[str, Any]:
    row: dict[str, Any] = {"wall_s": round(wall, 3), "batches": len(batches),
                           "ft_tokens": ft_tokens,
                           "ft_tokens_per_s": round(ft_tokens / wall, 1) if wall else 0.0}
    tokens = sum(b.tokens for b in batches)
    row["inference_tokens_per_s"] = round(tokens / wall, 1) if wall else 0.0
    row["inference_rows_per_s"] = round(sum(b.rows for b in batches) / wall, 2) if wall else 0
    met = [b.wall / max(b.passes, 1) <= slo[b.workload] for b in batches if b.workload in slo]
    row["slo_attainment"] = round(sum(met) / len(met), 4) if met else None
    for w in ("w1", "w3"):
        mine = [b for b in batches if b.workload == w]
        if mine:
            per_pass = [b.wall / max(b.passes, 1) for b in mine]
            row[f"{w}_ms_per_pass_p50"] = round(1e3 * statistics.median(per_pass), 3)
            if w in slo:
                row[f"{w}_slo_attainment"] = round(
                    sum(p <= slo[w] for p in per_pass) / len(per_pass), 4)
    judged = [p + a <= slo[wl] for wl, _, p, a in log.passes if wl in slo]
    row["pass_attainment"] = round(sum(judged) / len(judged), 4) if judged else None
    row["passes"] = len(log.passes)
    return row


def peak_gb() -> float | None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return None


def reset_peak() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------------------------- modes
@dataclass
class Bench:
    shape: str
    model: Any
    params: list[Any]
    engine: Engine
    scale: Scale
    vocab: int
    seconds: float
    out: Path
    args: argparse.Namespace
    slo: dict[str, float] = field(default_factory=dict)
    batch_time: float = 0.0

    def trainer(self) -> Trainer:
        return Trainer(self.model, self.params, train_set(self.scale, self.vocab), lr=2e-4,
                       epochs=1000, batch_size=self.scale.train_batch, seed=0,
                       chunk_tokens=FT_ITERATION_TOKENS)

    def emit(self, row: dict[str, Any]) -> None:
        row = {"shape": self.shape, **row}
        print(json.dumps(row), flush=True)
        with (self.out / "finetune_coserve.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")

    def inference(self, load: float) -> dict[str, Any]:
        reset_peak()
        log = PassLog()
        self.engine.after_pass = log
        start = time.perf_counter()
        batches = run_stream(self.engine, log, self.seconds, scale=self.scale,
                             vocab=self.vocab, interval=self._interval(load), coserver=None,
                             slo=self.slo)
        wall = time.perf_counter() - start
        self.engine.after_pass = None
        if load >= 1:  # the closed loop sets the objective and the arrival clock
            self._calibrate(batches)
            self.batch_time = wall / max(len(batches), 1)
        return {"mode": "inference", "load": load,
                **summarize(batches, log, self.slo, wall, 0), "peak_gb": peak_gb()}

    def _calibrate(self, batches: list[Batch]) -> None:
        if self.args.slo_ms is not None:
            self.slo = {w: self.args.slo_ms / 1e3 for w in ("w1", "w3")}
            return
        for w in ("w1", "w3"):
            per_pass = [b.wall / max(b.passes, 1) for b in batches if b.workload == w]
            if per_pass:
                self.slo[w] = self.args.slo_factor * statistics.median(per_pass)

    def _interval(self, load: float) -> float:
        return 0.0 if load >= 1 or self.batch_time <= 0 else self.batch_time / load

    def finetune(self) -> dict[str, Any]:
        reset_peak()
        trainer = self.trainer()
        layers = trainer.layers
        start = time.perf_counter()
        while time.perf_counter() - start < self.seconds:
            trainer.work(FT_ITERATION_TOKENS, layers)
        sync()
        wall = time.perf_counter() - start
        row = {"mode": "finetune", "load": 0.0, "wall_s": round(wall, 3),
               "ft_tokens": trainer.tokens, "ft_tokens_per_s": round(trainer.tokens / wall, 1),
               "ft_steps": trainer.step, "peak_gb": peak_gb(),
               "loss_first": trainer.loss_curve[0][1] if trainer.loss_curve else None,
               "loss_last": trainer.last_loss}
        del trainer
        return row

    def shared(self, mode: str, load: float, interval: int | None) -> dict[str, Any]:
        """Temporal sharing every ``interval`` passes (None: co-serving)."""
        reset_peak()
        trainer = self.trainer()
        coserver = CoServer(self.engine, token_budget=self.args.token_budget,
                            max_finetune_tokens=self.args.max_finetune_tokens,
                            interleave=interval is None)
        then: Any = self.engine.after_pass  # the co-server's hook
        blocks = [0]  # temporal sharing: fine-tuning blocks run (the mode ends after one)
        if interval is not None:
            then = self._temporal_hook(then, trainer, interval, blocks)
        log = PassLog(then=then)
        self.engine.after_pass = log
        job = coserver.submit(trainer)
        start = time.perf_counter()
        batches = run_stream(self.engine, log, self.seconds, scale=self.scale,
                             vocab=self.vocab, interval=self._interval(load),
                             coserver=coserver, slo=self.slo,
                             more=None if interval is None else lambda: blocks[0] < 1)
        job.cancel()
        job.wait(120)
        sync()
        wall = time.perf_counter() - start
        stats = coserver.stats()
        coserver.close()
        self.engine.after_pass = None
        row = {"mode": mode, "load": load, "interval": interval,
               **summarize(batches, log, self.slo, wall, trainer.tokens),
               "ft_steps": trainer.step, "peak_gb": peak_gb(),
               "interleaved_ft_tokens": stats.finetune_tokens,
               "temporal_blocks": blocks[0] if interval is not None else None,
               "idle_ft_tokens": stats.background_tokens,
               "passes_with_ft": stats.iterations,
               "error": None if job.error is None else repr(job.error)}
        if interval is None:
            row["fits"] = {k: _fit_row(coserver, k)
                           for k in (FORWARD, BACKWARD, "prefix", "prefill", "decode", "score")}
        del trainer, coserver, job
        return row

    @staticmethod
    def _temporal_hook(coserve_hook: Any, trainer: Trainer, interval: int,
                       blocks: list[int]) -> Any:
        count = [0]
        layers = trainer.layers

        def hook(step: Any) -> None:
            coserve_hook(step)  # counts the pass (interleave is off: no piece)
            count[0] += 1
            if count[0] % interval == 0:
                for _ in range(interval):
                    trainer.work(FT_ITERATION_TOKENS, layers)
                sync()
                blocks[0] += 1

        return hook


def _fit_row(coserver: CoServer, kind: str) -> dict[str, Any] | None:
    fit = coserver.model.fit(kind)
    if fit is None:
        return None
    error = coserver.model.error(kind)
    return {"a_ms": round(fit.a * 1e3, 4), "b_us": round(fit.b * 1e6, 4),
            "c_ns": round(fit.c * 1e9, 4), "points": fit.points,
            "mean_rel_error": None if error is None else round(error, 3)}


def warm_up(bench: Bench) -> None:
    """First kernels, cuBLAS handles, allocator: one batch of each workload and a few
    fine-tuning pieces, untimed."""
    gen = stream(bench.scale, bench.vocab, seed=99)
    for _ in range(2):
        bench.engine.run(next(gen)[1])
    trainer = bench.trainer()
    for _ in range(4):
        trainer.work(FT_ITERATION_TOKENS, trainer.layers)
    sync()


def run_shape(name: str, config: Any, args: argparse.Namespace, scale: Scale,
              deadline: float) -> None:
    device = "cpu" if args.smoke else "cuda"
    t0 = time.perf_counter()
    with torch.device(device):
        model = from_config(config, seed=0, device=device,
                            dtype="float32" if args.smoke else "bfloat16")
    params = attach_lora(model, rank=16, alpha=32, target_modules=("q_proj", "v_proj"),
                         seed=0, impl="auto")
    engine = Engine(model, eos=[EOS], pad=PAD, batch_size=16, margin=0.0)
    engine.timer = StepTimer()  # every mode synchronizes each pass alike
    bench = Bench(name, model, params, engine, scale, config.vocab_size, args.seconds,
                  args.out, args)
    bench.emit({"mode": "setup", "build_s": round(time.perf_counter() - t0, 1),
                "lora_impl": lora_impl("auto"), "lora_params": sum(p.numel() for p in params),
                "layers": config.num_hidden_layers, "hidden": config.hidden_size})
    warm_up(bench)
    plan: list[tuple[str, float, int | None]] = [("inference", 1.0, None), ("finetune", 0.0, None)]
    for load in args.loads:
        if load < 1:
            plan.append(("inference", load, None))
        plan.append(("coserve", load, None))
        plan.extend((f"temporal-{n}", load, n) for n in args.intervals)
    rows: list[dict[str, Any]] = []
    for mode, load, interval in plan:
        engine.timer.clear()
        expected = args.seconds * (3.0 if interval is not None else 1.5)
        if time.perf_counter() + expected > deadline:
            bench.emit({"mode": mode, "load": load, "interval": interval,
                        "skipped": "time budget"})
            continue
        try:
            if mode == "inference":
                row = bench.inference(load)
                if load >= 1:
                    row["slo_ms"] = {w: round(v * 1e3, 3) for w, v in bench.slo.items()}
            elif mode == "finetune":
                row = bench.finetune()
            else:
                row = bench.shared(mode, load, interval)
        except Exception as exc:  # noqa: BLE001 (one mode's failure is a row; the run goes on)
            traceback.print_exc()
            engine.after_pass = None
            row = {"mode": mode, "load": load, "interval": interval, "error": repr(exc)[:500]}
        rows.append(row)
        bench.emit(row)
    for load in args.loads:
        bench.emit(compare(rows, load))
    del bench, engine, model, params
    reset_peak()


def compare(rows: list[dict[str, Any]], load: float) -> dict[str, Any]:
    """Co-serving against the baselines at one load: fine-tuning throughput over each
    temporal-sharing run, inference throughput over inference alone, SLO attainments."""
    at = {r["mode"]: r for r in rows if r.get("load") == load and r.get("error") is None
          and "skipped" not in r}
    alone = at.get("inference")
    co = at.get("coserve")
    out: dict[str, Any] = {"mode": "compare", "load": load}
    if co is None:
        return {**out, "missing": "coserve"}
    out["coserve_slo_attainment"] = co.get("slo_attainment")
    out["coserve_ft_tokens_per_s"] = co.get("ft_tokens_per_s")
    if alone is not None and alone.get("inference_tokens_per_s"):
        out["inference_alone_slo_attainment"] = alone.get("slo_attainment")
        out["coserve_inference_vs_alone"] = round(
            co["inference_tokens_per_s"] / alone["inference_tokens_per_s"], 3)
    for mode, r in at.items():
        if mode.startswith("temporal-"):
            ft = r.get("ft_tokens_per_s") or 0.0
            out[f"{mode}_slo_attainment"] = r.get("slo_attainment")
            out[f"ft_speedup_vs_{mode}"] = (round(co["ft_tokens_per_s"] / ft, 3) if ft
                                            else None)
    finetune = next((r for r in rows if r.get("mode") == "finetune"
                     and r.get("error") is None and "skipped" not in r), None)
    if finetune and finetune.get("ft_tokens_per_s"):
        out["coserve_ft_share_of_alone"] = round(
            co["ft_tokens_per_s"] / finetune["ft_tokens_per_s"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="1b,8b")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: a check")
    ap.add_argument("--quick", action="store_true", help="shorter modes, closed loop only")
    ap.add_argument("--seconds", type=float, default=None, help="per mode")
    ap.add_argument("--budget", type=float, default=510.0,
                    help="seconds for the whole run; modes that would pass it are skipped")
    ap.add_argument("--loads", default=None, help="e.g. 1.0,0.5 (1: closed loop)")
    ap.add_argument("--intervals", default=None, help="temporal sharing N, e.g. 64,256,512")
    ap.add_argument("--slo-ms", type=float, default=None)
    ap.add_argument("--slo-factor", type=float, default=1.5)
    ap.add_argument("--token-budget", type=int, default=1024)
    ap.add_argument("--max-finetune-tokens", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    start = time.perf_counter()
    deadline = start + args.budget
    if args.smoke:
        default_seconds, loads, intervals = 1.5, "1.0,0.5", "4,8,16"
    elif args.quick:
        default_seconds, loads, intervals = 6.0, "1.0", "64,256,512"
    else:
        default_seconds, loads, intervals = 10.0, "1.0,0.5", "64,256,512"
    args.seconds = args.seconds or default_seconds
    args.loads = [float(x) for x in (args.loads or loads).split(",") if x]
    args.intervals = [int(x) for x in (args.intervals or intervals).split(",") if x]
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke on the CPU")
    import transformers

    env = {"mode": "env", "device": "cpu" if args.smoke else torch.cuda.get_device_name(),
           "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "seconds": args.seconds, "loads": args.loads,
           "intervals": args.intervals, "slo_factor": args.slo_factor, "slo_ms": args.slo_ms,
           "token_budget": args.token_budget, "max_finetune_tokens": args.max_finetune_tokens}
    print(json.dumps(env), flush=True)
    with (args.out / "finetune_coserve.jsonl").open("a") as f:
        f.write(json.dumps(env) + "\n")
    if args.smoke:
        torch.set_num_threads(1)
    scale = SMOKE if args.smoke else Scale()
    shapes = configs(args.smoke)
    for name in [s for s in args.shapes.split(",") if s]:
        try:
            run_shape(name, shapes[name], args, scale, deadline)
        except Exception as exc:  # noqa: BLE001 (a shape that fails is a row; the next runs)
            traceback.print_exc()
            row = {"shape": name, "mode": "failed", "error": repr(exc)[:500]}
            print(json.dumps(row), flush=True)
            with (args.out / "finetune_coserve.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            reset_peak()
    print(json.dumps({"mode": "done", "total_s": round(time.perf_counter() - start, 1)}),
          flush=True)


if __name__ == "__main__":
    main()
