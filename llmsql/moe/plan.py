"""The cost model that picks an expert-offload plan per call (no torch).

A step runs ``T`` tokens (a prefill chunk: its prompt tokens; a decode step: its rows)
through ``L`` MoE layers of ``E`` experts with top-``k`` routing; ``S`` expert slots fit on
the GPU out of ``N = L·E``. Per layer, a step uses ``U(T) = E·(1 − (1 − k/E)^T)`` distinct
experts (uniform routing; measured hit rates replace the guesses below when the runtime has
them). Moving one expert costs ``expert_bytes / h2d``; computing a layer costs its FLOPs over
``flops`` or its weight bytes over ``hbm``, whichever is larger.

The three plans (:data:`llmsql.moe.options.PLANS`):

- ``lru`` (reactive): misses load on the critical path; LRU keeps about ``S/N`` of the needed
  experts at small steps and thrashes to none once a step touches more than ``S`` experts
  between two uses of one (:func:`lru_hit_rate`).
- ``predictive`` (after ProMoE): a predictor of accuracy ``a`` fetches layer ``i+j``'s experts
  while earlier layers compute; the hits it gives overlap compute, its misses load on demand,
  its wrong guesses waste bandwidth. Eviction takes the expert whose layer comes round last
  (Belady's choice for the cyclic layer order), so about ``S/N`` stays resident at any step.
- ``layer_sweep`` (after FlexGen): ``S − W`` experts stay resident for good, a window of ``W``
  slots streams every other expert of each layer once per step, one layer ahead; with
  ``U ≈ E`` (large batches) no policy moves fewer bytes, and the transfer overlaps compute.

>>> shape = MoEShape(moe_layers=16, experts=64, top_k=8, hidden=2048, intermediate=1024)
>>> hw = Hardware(h2d_bytes_per_s=25e9)
>>> [choose_plan(shape, slots=410, tokens=t, hw=hw, accuracy=0.9).plan for t in (1, 8, 256)]
['predictive', 'predictive', 'layer_sweep']
>>> choose_plan(shape, slots=410, tokens=1, hw=hw, accuracy=0.0).plan
'lru'
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmsql.errors import ConfigError

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

NEXT_ROUTER_PRIOR = 0.5
"""The prefetch precision assumed for a predictor until the runtime has measured its own (the
next-router predictor, or a learned one without stored figures): an assumption, which EXPLAIN
and the engine share; ``llmsql moe-profile`` measures a learned predictor's."""


@dataclass(frozen=True, slots=True)
class MoEShape:
    """What the cost model needs of a model: its MoE layers and expert sizes."""

    moe_layers: int
    experts: int
    top_k: int
    hidden: int
    intermediate: int
    dtype_bytes: int = 2
    dense_bytes_per_layer: int = 0
    """Weights read per layer besides the experts (attention, router, shared experts)."""

    @property
    def expert_bytes(self) -> int:
        """One expert: gate_up [2I, H] and down [H, I]."""
        return 3 * self.hidden * self.intermediate * self.dtype_bytes

    @property
    def total_experts(self) -> int:
        """Experts over all MoE layers."""
        return self.moe_layers * self.experts

    @property
    def total_expert_bytes(self) -> int:
        """Bytes of all experts."""
        return self.total_experts * self.expert_bytes

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any, *, dtype: str = "bfloat16"
                    ) -> MoEShape:
        """The shape of a Mixtral, Qwen2/3-MoE or OLMoE config (a ``config.json`` mapping or a
        transformers config object).

        Raises:
            ConfigError: the config has no mixture-of-experts layers.
        """
        get = config.get if isinstance(config, Mapping) else (
            lambda k, d=None: getattr(config, k, d))
        experts = get("num_local_experts") or get("num_experts")
        top_k = get("num_experts_per_tok")
        if not experts or not top_k:
            kind = get("model_type", "this model")
            msg = (f"{kind} is not a mixture-of-experts model (its config has no "
                   "num_experts / num_local_experts): expert offload options apply to MoE "
                   "models such as Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE; drop expert_cache")
            raise ConfigError(msg)
        layers = int(get("num_hidden_layers"))
        dense = set(get("mlp_only_layers", None) or [])
        step = int(get("decoder_sparse_step", 1) or 1)
        moe = [i for i in range(layers) if i not in dense and (i + 1) % step == 0]
        hidden = int(get("hidden_size"))
        inter = int(get("moe_intermediate_size", None) or get("intermediate_size"))
        heads = int(get("num_attention_heads"))
        kv = int(get("num_key_value_heads", None) or heads)
        head_dim = int(get("head_dim", None) or hidden // heads)
        attn = hidden * head_dim * (2 * heads + 2 * kv)
        shared = 3 * hidden * int(get("shared_expert_intermediate_size", 0) or 0)
        size = BYTES.get(dtype, 2)
        return cls(moe_layers=len(moe), experts=int(experts), top_k=int(top_k), hidden=hidden,
                   intermediate=inter, dtype_bytes=size,
                   dense_bytes_per_layer=(attn + shared + hidden * int(experts)) * size)

    @classmethod
    def from_model_dir(cls, path: str | Path, *, dtype: str = "bfloat16") -> MoEShape:
        """:meth:`from_config` on ``path/config.json``."""
        file = Path(path) / "config.json"
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            msg = f"cannot read {file}: {exc}; expert offload needs the model's config.json"
            raise ConfigError(msg) from exc
        return cls.from_config(config, dtype=dtype)


@dataclass(frozen=True, slots=True)
class Hardware:
    """Rates the estimates use; the engine measures ``h2d_bytes_per_s`` on its GPU."""

    h2d_bytes_per_s: float = 25e9
    """Host-to-device copy rate from pinned memory (PCIe 4 x16 measures about 25 GB/s)."""
    flops_per_s: float = 400e12
    """Dense matrix rate actually reached (about half an H100's bf16 peak)."""
    hbm_bytes_per_s: float = 2.5e12
    """GPU memory bandwidth actually reached."""
    layer_overhead_s: float = 3e-4
    """Fixed time per decoder layer in eager PyTorch (kernel launches, the host sync on the
    routing): what bounds small decode steps."""


@dataclass(frozen=True, slots=True)
class PlanEstimate:
    """One plan's expected cost for a step of ``tokens`` tokens (EXPLAIN shows these)."""

    plan: str
    slots: int
    """Expert slots on the GPU."""
    total_experts: int
    expert_gpu_bytes: int
    tokens: int
    experts_used_per_layer: float
    hit_rate: float
    """Share of the needed experts resident when their layer starts."""
    bytes_per_step: float
    seconds_per_step: float
    resident: int = 0
    """For ``layer_sweep``: experts that stay on the GPU for good."""
    reason: str = ""
    alternatives: tuple[tuple[str, float], ...] = field(default=())
    """(plan, seconds per step) of every plan considered, cheapest first."""

    @property
    def bytes_per_token(self) -> float:
        """Bytes moved per token of the step."""
        return self.bytes_per_step / max(self.tokens, 1)

    def describe(self) -> str:
        """One EXPLAIN line."""
        gib = self.expert_gpu_bytes / 2**30
        return (f"moe plan={self.plan} slots={self.slots}/{self.total_experts} "
                f"({gib:.1f} GiB) expected hit rate {self.hit_rate:.0%}, "
                f"{self.bytes_per_token / 1e6:.1f} MB moved per token at {self.tokens} "
                f"tokens per step, {self.seconds_per_step * 1e3:.1f} ms per step"
                + (f" ({self.reason})" if self.reason else ""))


@dataclass(frozen=True, slots=True)
class OffloadStats:
    """What the offload runtime measured (ANALYZE shows these); counts are experts."""

    steps: int = 0
    tokens: int = 0
    needed: int = 0
    """Expert uses (one per layer per distinct expert per step)."""
    hits: int = 0
    """Of ``needed``, resident (or arriving) when the layer started."""
    prefetched: int = 0
    prefetch_used: int = 0
    bytes_h2d: int = 0
    wait_seconds: float = 0.0
    """Time the compute waited for experts."""
    plans: tuple[tuple[str, int], ...] = ()
    """(plan, steps) as run."""

    @property
    def hit_rate(self) -> float:
        """Share of the needed experts resident when their layer started."""
        return self.hits / self.needed if self.needed else 0.0

    @property
    def prefetch_precision(self) -> float:
        """Share of the prefetched experts that were used."""
        return self.prefetch_used / self.prefetched if self.prefetched else 0.0

    def describe(self) -> str:
        """One ANALYZE line."""
        per_token = self.bytes_h2d / max(self.tokens, 1) / 1e6
        return (f"moe measured: hit rate {self.hit_rate:.0%} over {self.needed} expert uses, "
                f"{self.bytes_h2d / 1e9:.2f} GB moved ({per_token:.1f} MB per token), "
                f"prefetch precision {self.prefetch_precision:.0%}, "
                f"waited {self.wait_seconds:.2f} s")


def slots_for(shape: MoEShape, expert_cache: int | float) -> int:
    """Expert slots that ``expert_cache`` (bytes, or a share of all experts) buys.

    >>> shape = MoEShape(moe_layers=2, experts=8, top_k=2, hidden=4, intermediate=8)
    >>> slots_for(shape, 0.5), slots_for(shape, 10 * shape.expert_bytes), slots_for(shape, 1.0)
    (8, 10, 16)
    """
    if isinstance(expert_cache, float):
        slots = math.floor(expert_cache * shape.total_experts + 1e-9)
    else:
        slots = expert_cache // shape.expert_bytes
    return int(min(slots, shape.total_experts))


def check_slots(shape: MoEShape, slots: int, expert_cache: int | float) -> None:
    """ConfigError when the cache cannot hold one layer's top-k experts (one token's)."""
    if slots < shape.top_k:
        need = shape.top_k * shape.expert_bytes
        msg = (f"expert_cache={expert_cache!r} holds {slots} experts, fewer than one layer's "
               f"top-k ({shape.top_k}): give at least {shape.top_k} experts "
               f"({need / 1e9:.2f} GB, or a share of {shape.top_k / shape.total_experts:.3f})")
        raise ConfigError(msg)


def experts_used(shape: MoEShape, tokens: int) -> float:
    """Expected distinct experts a layer uses for ``tokens`` tokens under uniform routing."""
    return shape.experts * (1.0 - (1.0 - shape.top_k / shape.experts) ** max(tokens, 1))


def compute_seconds(shape: MoEShape, tokens: int, used: float, hw: Hardware) -> float:
    """One layer's compute: FLOPs over the rate, or weight bytes over HBM, the larger, plus
    the fixed per-layer cost of launching its kernels.
    """
    flops = 2 * tokens * (shape.top_k * shape.expert_bytes / shape.dtype_bytes
                          + shape.dense_bytes_per_layer / shape.dtype_bytes)
    weights = used * shape.expert_bytes + shape.dense_bytes_per_layer
    return max(flops / hw.flops_per_s, weights / hw.hbm_bytes_per_s) + hw.layer_overhead_s


def lru_hit_rate(share: float, q: float) -> float:
    """LRU's hit rate when each step uses each expert with probability ``q``, layer after
    layer: an expert survives until its next use ``g`` steps later only if fewer than the
    cache's slots of other experts were touched meanwhile, ``N·(1 − (1 − q)^g) < S``; ``g``
    is geometric. Small ``q`` gives about ``S/N``; large ``q`` (big batches) thrashes to 0.

    >>> round(lru_hit_rate(0.4, 0.125), 3), lru_hit_rate(0.4, 0.65), lru_hit_rate(1.0, 0.5)
    (0.33, 0.0, 1.0)
    """
    if share >= 1.0:
        return 1.0
    if q >= 1.0:
        return 0.0
    longest = math.floor(math.log(1 - share) / math.log(1 - q) + 1e-9)
    return 1.0 - (1.0 - q) ** longest


def _resident_share(free: float, shape: MoEShape, window: float) -> float:
    """Share of all experts resident for good when ``window`` slots stream (``free`` = slots
    left over; the window's experts come from the non-resident rest).
    """
    if free <= 0:
        return 0.0
    return min(free / max(shape.total_experts - window, 1.0), 1.0)


def estimate(shape: MoEShape, plan: str, *, slots: int, tokens: int, hw: Hardware,
             accuracy: float = 0.0, lookahead: int = 2) -> PlanEstimate:
    """``plan``'s expected cost for one step of ``tokens`` tokens.

    One copy engine serves the step: prefetches overlap the compute of earlier layers, loads
    on demand (misses) stall it. ``lru``: ``C + M·t``; ``predictive``: ``max(C, (a·M + w)·t)
    + (1 − a)·M·t`` with ``w`` wasted copies of wrong guesses; ``layer_sweep``: ``max(C,
    streamed·t)``; ``C`` the step's compute, ``M`` its misses, ``t`` one expert's copy.
    """
    used = experts_used(shape, tokens)
    layers = shape.moe_layers
    compute = compute_seconds(shape, tokens, used, hw) * layers
    move = shape.expert_bytes / hw.h2d_bytes_per_s
    share = slots / shape.total_experts
    resident = 0
    misses = used * (1 - share) * layers
    if plan == "lru":
        hit = lru_hit_rate(share, used / shape.experts)
        moved = used * (1 - hit) * layers
        seconds = compute + moved * move
    elif plan == "predictive":
        # slots in flight (this layer's and ``lookahead`` layers' arrivals) are not resident
        share = _resident_share(slots - (lookahead + 1) * used, shape, (lookahead + 1) * used)
        misses = used * (1 - share) * layers
        hit = share + (1 - share) * accuracy
        wasted = misses * (1 - accuracy)
        moved = misses + wasted
        seconds = max(compute, (misses * accuracy + wasted) * move) + misses * (
            1 - accuracy) * move
    elif plan == "layer_sweep":
        # double buffer: the layer computing and the next one arriving
        window = 2 * shape.experts
        hit = _resident_share(slots - window, shape, window)
        resident = round(hit * shape.total_experts)
        moved = shape.experts * layers * (1 - hit)
        # no room for two layers: copies and compute alternate
        seconds = (compute + moved * move if slots < window
                   else max(compute, moved * move))
    else:
        msg = f"unknown plan {plan!r}"
        raise ConfigError(msg)
    return PlanEstimate(plan=plan, slots=slots, total_experts=shape.total_experts,
                        expert_gpu_bytes=slots * shape.expert_bytes, tokens=tokens,
                        experts_used_per_layer=used, hit_rate=min(hit, 1.0),
                        bytes_per_step=moved * shape.expert_bytes,
                        seconds_per_step=seconds, resident=resident)


def choose_plan(shape: MoEShape, *, slots: int, tokens: int, hw: Hardware | None = None,
                accuracy: float = 0.0, lookahead: int = 2, plan: str = "auto") -> PlanEstimate:
    """The plan to run a step of ``tokens`` tokens with: ``plan`` itself unless ``auto``,
    else the cheapest of ``predictive``, ``layer_sweep`` and ``lru`` by :func:`estimate`
    (``predictive`` needs a predictor: with ``accuracy`` 0 it is LRU plus wasted copies,
    so it never wins then). Every cached expert fits: the plan is ``all_resident``.
    """
    hw = hw or Hardware()
    if slots >= shape.total_experts:
        est = estimate(shape, "lru", slots=slots, tokens=tokens, hw=hw)
        return _with(est, plan="all_resident", reason="every expert fits on the GPU")
    plans = ("layer_sweep", "predictive", "lru") if plan == "auto" else (plan,)
    ests = sorted((estimate(shape, p, slots=slots, tokens=tokens, hw=hw, accuracy=accuracy,
                            lookahead=lookahead) for p in plans),
                  key=lambda e: e.seconds_per_step)
    best = ests[0]
    alts = tuple((e.plan, e.seconds_per_step) for e in ests)
    reason = "chosen" if plan != "auto" else (
        f"cheapest of {', '.join(f'{p} {s * 1e3:.1f} ms' for p, s in alts)}")
    return _with(best, alternatives=alts, reason=reason)


def _with(est: PlanEstimate, **changes: Any) -> PlanEstimate:
    import dataclasses

    return dataclasses.replace(est, **changes)


def pcie_floor_seconds(shape: MoEShape, *, slots: int, tokens: int, hw: Hardware) -> float:
    """The floor for one step: expert bytes that must move (every used expert not resident,
    with the best static residency) over the copy rate, or compute if larger.
    """
    used = experts_used(shape, tokens)
    must = max(used * shape.moe_layers - slots, 0.0) * shape.expert_bytes
    compute = compute_seconds(shape, tokens, used, hw) * shape.moe_layers
    return max(must / hw.h2d_bytes_per_s, compute)
