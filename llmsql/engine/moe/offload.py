"""Expert offload: experts in host memory, a cache of expert slots on the GPU, prefetching.

After ProMoE (Song et al.): each MoE layer's fused ``experts`` module is replaced by an
:class:`OffloadedExperts` that computes with slots of one shared GPU pool
(``gate_up[S, 2I, H]``, ``down[S, H, I]``); the experts themselves stay in (pinned) host
memory, one contiguous slab per layer. An :class:`ExpertOffload` runtime owns the pool, the
slot table (:mod:`~llmsql.engine.moe.cache`), a prefetch thread with its own CUDA stream, a
high-priority stream for misses, the predictor and the measurements.

The mechanism, per MoE layer call:

1. The router has spoken: the layer's needed experts are known. Queued prefetches for this
   layer that it does not need are dropped (early preemption).
2. The predictor looks ahead (``lookahead`` layers) and queues prefetches, best first.
3. The resident (and arrived) experts compute first, as one grouped computation over their
   slots (:func:`grouped_experts`: two grouped GEMMs, no host sync per expert); then the
   misses, which this thread copies at once on the miss stream (taking over a queued
   prefetch of one), compute as a second group (reordered inference). Slots are pinned
   while their group is issued, and a CUDA event records their last use, so no copy
   overwrites them early.

The prefetch thread issues copies in chunks (``chunk_bytes``), at most :data:`IN_FLIGHT` in
flight, so a miss's copy shares the link with little (chunked prefetch); a copy into a slot
waits for the slot's last reader and its last writer on the other stream.

Plans (:data:`llmsql.moe.options.PLANS`): ``lru`` loads on misses only, LRU eviction;
``predictive`` prefetches from the predictor, cyclic (Belady) eviction; ``layer_sweep``
prefetches every expert of the next layer, cyclic eviction, so the experts that stay are a
fixed set and the rest stream once per step; ``auto`` picks per step from
:func:`llmsql.moe.plan.choose_plan` with the step's token count and the prefetch accuracy
measured so far.

On a CPU the same code runs with synchronous copies (tests check it against the stock
modules); on a GPU the copies overlap compute.

Why this module is over 500 lines: the runtime's compute side (plan per step, the layer call,
prefetch, switching to the whole-layer sweep) and its copy thread share one lock, one slot
table and one set of in-flight loads; split across modules, every piece would reach into the
others' private state. The parts that stand alone are already apart (the slot table, the
sweep, the plan trials, installation, predictors).
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llmsql.engine.moe.cache import Key, SlotTable
from llmsql.engine.moe.predictors import NoPredictor, Predictor
from llmsql.engine.moe.sweep import LayerSweep
from llmsql.engine.moe.trials import PlanTrials
from llmsql.moe.plan import (
    NEXT_ROUTER_PRIOR,
    Hardware,
    MoEShape,
    OffloadStats,
    PlanEstimate,
    check_slots,
    choose_plan,
    slots_for,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from llmsql.moe.options import MoEOptions

CHUNK_BYTES = 16 * 2**20
"""Copy granularity: a miss overtakes a prefetch at a chunk boundary."""

IN_FLIGHT = 4
"""Chunks queued on the copy stream at once: enough to keep the link busy while the copy
thread waits for the interpreter lock, few enough that a miss waits behind little."""

SWITCH_INTERVAL_S = 2e-4
"""The interpreter's thread switch interval while a GPU offload runs (Python's default, 5 ms,
would leave the copy thread waiting for the lock for longer than a chunk takes to copy)."""

@dataclass
class _Load:
    key: Key
    slot: int
    demand: bool
    next_chunk: int = 0
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    event: Any = None
    """The CUDA event recorded after the last chunk (None on the CPU)."""
    counted: bool = False
    """A prefetch whose use has been counted (``prefetch_used``)."""


class _Counters:
    """Running :class:`OffloadStats` counts, added to from both threads."""

    def __init__(self) -> None:
        zero = OffloadStats()
        self.counts: dict[str, Any] = {f.name: getattr(zero, f.name)
                                       for f in dataclasses.fields(zero) if f.name != "plans"}
        self.plans: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, **kw: float) -> None:
        with self._lock:
            for name, value in kw.items():
                self.counts[name] += value

    def snapshot(self) -> OffloadStats:
        with self._lock:
            return OffloadStats(**self.counts, plans=tuple(sorted(self.plans.items())))


class ExpertOffload:
    """The runtime shared by every :class:`OffloadedExperts` of one model."""

    def __init__(self, shape: MoEShape, options: MoEOptions, *, layers: tuple[int, ...],
                 host: dict[int, tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                 predictor: Predictor, act: Callable[[torch.Tensor], torch.Tensor],
                 hardware: Hardware | None = None, accuracy: float = NEXT_ROUTER_PRIOR,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        self.shape, self.options, self.layers = shape, options, layers
        self.host, self.device, self.predictor, self.act = host, device, predictor, act
        self.slots = slots_for(shape, options.expert_cache)
        check_slots(shape, self.slots, options.expert_cache)
        self.hardware = hardware or Hardware()
        self.prior_accuracy = accuracy
        self.chunk_bytes = chunk_bytes
        gate_up, down = host[layers[0]]
        self.pool = (torch.empty((self.slots, *gate_up.shape[1:]), dtype=gate_up.dtype,
                                 device=device),
                     torch.empty((self.slots, *down.shape[1:]), dtype=down.dtype,
                                 device=device))
        self.table = SlotTable(self.slots, layers=layers, policy="lru")
        self.plan = "lru" if options.plan == "auto" else options.plan
        self.route_log: list[tuple[int, tuple[int, ...]]] | None = None
        self._counters = _Counters()
        self._cuda = device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(device) if self._cuda else None
        self._miss_stream = torch.cuda.Stream(device, priority=-1) if self._cuda else None
        self._last_use: dict[int, Any] = {}
        self._last_write: dict[int, Any] = {}
        self._inflight: deque[Any] = deque()
        if self._cuda:
            sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        self._loads: dict[Key, _Load] = {}
        self._prefetch: deque[_Load] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._busy: _Load | None = None
        self._sweep = (LayerSweep(layers=layers, experts=shape.experts, slots=self.slots,
                                  pool=self.pool, host=host, copy_stream=self._copy_stream,
                                  device=device)
                       if LayerSweep.fits(self.slots, shape.experts) else None)
        self._bulk = False
        candidates = ("layer_sweep", "lru") if isinstance(predictor, NoPredictor) else (
            "layer_sweep", "predictive", "lru")
        self.trials = PlanTrials(candidates)
        self._step: tuple[int, str, float, bool] | None = None
        self._thread = threading.Thread(target=self._copier, name="llmsql-expert-copy",
                                        daemon=True)
        self._thread.start()

    # -- per step -------------------------------------------------------------------------

    def begin_step(self, tokens: int) -> None:
        """The first MoE layer of a forward pass: pick the plan for this step (``auto``:
        the cost model's, checked against measured step times, :mod:`.trials`).
        """
        if self.options.plan == "auto":
            self._time_step()
            choice = self.estimate(tokens).plan
            choice = "layer_sweep" if choice == "all_resident" else choice
            previous = self.plan
            self.plan = self.trials.choose(tokens, choice)
            counted = self.plan == previous and self._step is not None
            self._step = (tokens, self.plan, time.perf_counter(), counted)
        bulk = self.plan == "layer_sweep" and self._sweep is not None
        if bulk != self._bulk:
            self._switch()
            self._bulk = bulk
        self.table.policy = "lru" if self.plan == "lru" else "cyclic"
        self._counters.plans[self.plan] = self._counters.plans.get(self.plan, 0) + 1
        self._counters.add(steps=1, tokens=tokens)

    def _time_step(self) -> None:
        """Record the step that just ended (``auto`` only; syncs the GPU to time it)."""
        if self._step is None:
            return
        if self._cuda:
            torch.cuda.synchronize(self.device)
        tokens, plan, start, counted = self._step
        self.trials.record(tokens, plan, time.perf_counter() - start, counted=counted)

    def estimate(self, tokens: int) -> PlanEstimate:
        """The cost model's plan for a step of ``tokens`` tokens, with the accuracy measured
        so far (the prior until 64 prefetches have been judged).
        """
        return choose_plan(self.shape, slots=self.slots, tokens=tokens, hw=self.hardware,
                           accuracy=self.accuracy(), lookahead=self.options.lookahead,
                           plan=self.options.plan)

    def accuracy(self) -> float:
        """The prefetch precision measured so far (the prior until 64 prefetches)."""
        if isinstance(self.predictor, NoPredictor):
            return 0.0
        s = self._counters.snapshot()
        return self.prior_accuracy if s.prefetched < 64 else s.prefetch_precision

    # -- the layer call -------------------------------------------------------------------

    def run_layer(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor) -> torch.Tensor:
        """What :class:`OffloadedExperts` does (see the module docstring)."""
        if layer == self.layers[0]:
            self.begin_step(int(hidden.shape[0]))
        needed = [int(e) for e in torch.unique(top_k_index).tolist()]
        if self.route_log is not None:
            self.route_log.append((layer, tuple(needed)))
        if self._bulk:
            return self._run_bulk(layer, hidden, top_k_index, top_k_weights, needed)
        self.table.now(layer)
        self._drop_wrong(layer, set(needed))
        self._count_hits(layer, needed)
        self._lookahead(layer, hidden, top_k_index)
        return self._compute(layer, hidden, top_k_index, top_k_weights, needed)

    def _run_bulk(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor, needed: list[int]) -> torch.Tensor:
        """``layer_sweep`` with whole-layer copies (:mod:`~llmsql.engine.moe.sweep`)."""
        assert self._sweep is not None
        base, hit = self._sweep.base(layer, self._counters.add)
        self._counters.add(needed=len(needed), hits=len(needed) if hit else 0,
                           prefetch_used=len(needed) if layer not in self._sweep.resident
                           else 0)
        out = torch.zeros_like(hidden)
        layer_pool = (self.pool[0][base:base + self.shape.experts],
                      self.pool[1][base:base + self.shape.experts])
        grouped_experts(layer_pool, top_k_index, hidden, top_k_weights, out, self.act)
        self._sweep.used(layer)
        return out

    def _switch(self) -> None:
        """Between the per-expert cache and the whole-layer sweep: wait for the copy thread
        to go idle (dropping queued prefetches), then forget what the pool holds.
        """
        with self._cv:
            for load in list(self._prefetch):
                load.cancelled = True
            self._prefetch.clear()
        while True:
            with self._cv:
                if self._busy is None:
                    break
            time.sleep(0.0005)
        if self._cuda:
            # every copy issued so far (the sweep's one layer ahead too) lands before
            # anything the new plan copies or computes: both streams wait for compute
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self._miss_stream)
            current.wait_stream(self._copy_stream)
            event = torch.cuda.Event()
            event.record(current)
            self._copy_stream.wait_event(event)  # type: ignore[union-attr]
            self._miss_stream.wait_event(event)  # type: ignore[union-attr]
        self.table = SlotTable(self.slots, layers=self.layers, policy=self.table.policy)
        self._loads.clear()
        self._last_use.clear()
        self._last_write.clear()
        if self._sweep is not None:
            self._sweep.reset()

    def _count_hits(self, layer: int, needed: list[int]) -> None:
        hits = sum(self.table.lookup((layer, e)) is not None for e in needed)
        used = 0
        for e in needed:
            load = self._loads.get((layer, e))
            if load is not None and not load.demand and not load.counted:
                load.counted = True
                used += 1
        self._counters.add(needed=len(needed), hits=hits, prefetch_used=used)

    def _drop_wrong(self, layer: int, needed: set[int]) -> None:
        """Early preemption: cancel queued prefetches of this layer it does not need."""
        with self._cv:
            for load in list(self._prefetch):
                if load is self._busy:
                    continue  # its chunks are on the way: cancelling would race a miss's copy
                if load.key[0] == layer and load.key[1] not in needed and self.table.cancel(
                        load.key):
                    load.cancelled = True
                    self._prefetch.remove(load)
                    self._loads.pop(load.key, None)

    def _lookahead(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor) -> None:
        if self.plan == "lru":
            return
        if self.plan == "layer_sweep":
            ahead = self._next_layers(layer, 1)
            wanted = [(later, e) for later in ahead for e in range(self.shape.experts)]
        else:
            scores = self.predictor.predict(layer, hidden, top_k_index,
                                            self.options.lookahead)
            wanted = []
            for later in sorted(scores):
                s = scores[later].float().cpu()
                order = torch.argsort(s, descending=True, stable=True).tolist()
                wanted += [(later, int(e)) for e in order if s[e] >= 0.5]
        for key in wanted:
            if self.table.lookup(key) is None and not self._queue(key, demand=False):
                break  # no slot that is needed later than this one: stop

    def _next_layers(self, layer: int, count: int) -> list[int]:
        i = self.layers.index(layer)
        return [self.layers[(i + j) % len(self.layers)] for j in range(1, count + 1)]

    def _queue(self, key: Key, *, demand: bool) -> bool:
        got = self.table.reserve(key, prefetch=not demand)
        if got is None:
            return False
        slot, evicted = got
        load = _Load(key=key, slot=slot, demand=demand)
        with self._cv:
            if evicted is not None:
                self._loads.pop(evicted, None)
            self._loads[key] = load
            if not demand:
                self._prefetch.append(load)
                self._cv.notify()
        if demand:
            self._copy_now(load)
        else:
            self._counters.add(prefetched=1)
        return True

    def _compute(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor, needed: list[int]) -> torch.Tensor:
        """Resident (and arrived) experts first, as one grouped computation, while the
        misses' copies, issued right after, are in flight; then the misses as they arrive.
        """
        out = torch.zeros_like(hidden)
        todo = list(needed)
        while todo:
            ready = [e for e in todo if self._is_ready((layer, e))]
            if not ready:
                self._demand_missing(layer, todo)
                ready = [e for e in todo if self._is_ready((layer, e))] or self._wait_ready(
                    layer, todo)
            self._group(layer, ready, hidden, top_k_index, top_k_weights, out)
            todo = [e for e in todo if e not in ready]
        return out

    def _demand_missing(self, layer: int, todo: list[int]) -> None:
        """Copy the layer's misses now, from this thread, on the high-priority miss stream
        (a queued prediction of one is taken over; one the copy thread is copying is left
        to it).
        """
        for e in todo:
            key = (layer, e)
            if self.table.lookup(key) is None:
                self._queue(key, demand=True)  # may fail while every slot is loading
            else:
                self._take_over(key)

    def _take_over(self, key: Key) -> None:
        """A queued prefetch the layer now needs is copied at once (it is a miss now)."""
        with self._cv:
            load = self._loads.get(key)
            if (load is None or load.demand or load is self._busy
                    or load not in self._prefetch):
                return  # the copy thread finishes the one it is copying
            self._prefetch.remove(load)
            load.demand = True
        self._copy_now(load)

    def _is_ready(self, key: Key) -> bool:
        load = self._loads.get(key)
        slot = self.table.lookup(key)
        return slot is not None and (load is None or load.done.is_set())

    def _wait_ready(self, layer: int, todo: list[int]) -> list[int]:
        """Block until one of ``todo``'s copies is issued (the copy thread's, or a slot to
        free up); return every one then ready.
        """
        start = time.perf_counter()
        while True:
            for e in todo:
                load = self._loads.get((layer, e))
                if self.table.lookup((layer, e)) is not None and load is not None:
                    load.done.wait()
                    self._counters.add(wait_seconds=time.perf_counter() - start)
                    return [x for x in todo if self._is_ready((layer, x))]
            self._demand_missing(layer, todo)  # every slot was loading: try again
            time.sleep(0)

    def _group(self, layer: int, experts: list[int], hidden: torch.Tensor,
               top_k_index: torch.Tensor, top_k_weights: torch.Tensor, out: torch.Tensor
               ) -> None:
        """``experts`` (all ready) on their tokens, one grouped computation over their slots,
        added into ``out``; their slots' last use is recorded so no copy overwrites them early.
        """
        slots = []
        for e in experts:
            key = (layer, e)
            slot = self.table.lookup(key)
            assert slot is not None
            self.table.pin(slot)
            slots.append(slot)
            load = self._loads.pop(key, None)
            if load is not None and load.event is not None:
                torch.cuda.current_stream(self.device).wait_event(load.event)
        try:
            where = [self.slots] * self.shape.experts
            for e, slot in zip(experts, slots, strict=True):
                where[e] = slot
            slot_of = torch.tensor(where, dtype=torch.int64).to(hidden.device,
                                                                 non_blocking=True)
            grouped_experts(self.pool, slot_of[top_k_index], hidden, top_k_weights, out,
                            self.act)
            if self._cuda:
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(self.device))
                for slot in slots:
                    self._last_use[slot] = ev
        finally:
            for slot in slots:
                self.table.unpin(slot)

    # -- the copy thread ------------------------------------------------------------------

    def _copier(self) -> None:
        """Prefetches, one at a time, best first, in bounded chunks."""
        if self._cuda:
            torch.cuda.set_device(self.device.index or 0)
        while True:
            with self._cv:
                while not self._prefetch and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                load = self._prefetch[0]
                self._busy = load
            try:
                finished = self._copy_some(load)
            finally:
                with self._cv:
                    self._busy = None
            with self._cv:
                if (finished or load.cancelled) and load in self._prefetch:
                    self._prefetch.remove(load)

    def _chunks(self, load: _Load, chunk_bytes: int
                ) -> list[tuple[torch.Tensor, torch.Tensor, int, int]]:
        layer, e = load.key
        gate_up, down = self.host[layer]
        parts = [(self.pool[0][load.slot], gate_up[e]), (self.pool[1][load.slot], down[e])]
        return [(d, s, a, b) for d, s in parts
                for a, b in _spans(s.numel() * s.element_size(), chunk_bytes, s.shape[0])]

    def _copy_some(self, load: _Load) -> bool:
        """Copy a prefetch's chunks until done or cancelled; True when done. At most
        :data:`IN_FLIGHT` chunks are queued on the copy stream at a time, so the link is
        shared with a miss's copy (on its own stream) by little.
        """
        chunks = self._chunks(load, self.chunk_bytes)
        ev = None
        while load.next_chunk < len(chunks):
            if load.cancelled:
                return False
            while len(self._inflight) >= IN_FLIGHT:
                self._inflight.popleft().synchronize()
            dst, src, a, b = chunks[load.next_chunk]
            ev = self._issue(load, dst[a:b], src[a:b], first=load.next_chunk == 0,
                             stream=self._copy_stream)
            if ev is not None:
                self._inflight.append(ev)
            load.next_chunk += 1
            self._counters.add(bytes_h2d=(b - a) * src[0].numel() * src.element_size())
        self._finish(load, ev)
        return True

    def _copy_now(self, load: _Load) -> None:
        """A miss: both halves of the expert, issued at once on the miss stream."""
        ev = None
        for n, (dst, src, a, b) in enumerate(self._chunks(load, 2**62)):
            ev = self._issue(load, dst[a:b], src[a:b], first=n == 0, stream=self._miss_stream)
            self._counters.add(bytes_h2d=(b - a) * src[0].numel() * src.element_size())
        self._finish(load, ev)

    def _finish(self, load: _Load, ev: Any) -> None:
        load.event = ev
        if ev is not None:
            self._last_write[load.slot] = ev
        self.table.mark_ready(load.slot, load.key)
        load.done.set()

    def _issue(self, load: _Load, dst: torch.Tensor, src: torch.Tensor, *, first: bool,
               stream: Any) -> Any:
        """One copy into ``load``'s slot; the first waits for the slot's last reader and
        last writer (a copy on the other stream).
        """
        if not self._cuda:
            dst.copy_(src)
            return None
        with torch.cuda.stream(stream):
            if first:
                for after in (self._last_use.pop(load.slot, None),
                              self._last_write.get(load.slot)):
                    if after is not None:
                        stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
        return ev

    # -- measurements and life cycle ------------------------------------------------------

    def stats(self) -> OffloadStats:
        """What was measured since the start or the last :meth:`reset_stats`."""
        return self._counters.snapshot()

    def reset_stats(self) -> None:
        """Start measuring afresh."""
        self._counters = _Counters()

    def describe(self) -> str:
        """One line for logs and EXPLAIN."""
        gib = self.slots * self.shape.expert_bytes / 2**30
        return (f"expert offload: {self.slots}/{self.shape.total_experts} experts on "
                f"{self.device} ({gib:.1f} GiB), plan {self.options.plan}, predictor "
                f"{self.predictor.name}, lookahead {self.options.lookahead}")

    def close(self) -> None:
        """Stop the copy thread (the pool is freed with the object)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=10)

    def check(self) -> None:
        """Bookkeeping invariants (tests): the table's, and no pinned slot left."""
        self.table.check()


def grouped_experts(pool: tuple[torch.Tensor, torch.Tensor], slot_of: torch.Tensor,
                    hidden: torch.Tensor, weights: torch.Tensor, out: torch.Tensor,
                    act: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Every (token, choice) pair through the expert in its slot, weighted, added into
    ``out``: the stock module's arithmetic as two grouped GEMMs over the pool, with no host
    sync. ``slot_of`` is (tokens, k): the slot of each pair's expert, or ``len(pool)`` for a
    pair left out (sorted past the last group, which the GEMMs skip; masked here).
    """
    slots, k = pool[0].shape[0], slot_of.shape[-1]
    flat = slot_of.reshape(-1)
    order = torch.argsort(flat, stable=True)
    grouped = flat[order]
    tok = torch.div(order, k, rounding_mode="floor")
    counts = torch.histc(grouped.float() if grouped.device.type == "cpu" else grouped.int(),
                         bins=slots, min=0, max=slots - 1)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    gate, up = _grouped_linear(hidden[tok], pool[0], offs).chunk(2, dim=-1)
    y = _grouped_linear(act(gate) * up, pool[1], offs)
    y = torch.where((grouped < slots)[:, None], y * weights.reshape(-1)[order, None], 0)
    out.index_add_(0, tok, y.to(out.dtype))


def _grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows ``offs[g-1]:offs[g]`` of ``x`` times ``w[g]``ᵀ for every group ``g`` (rows past
    ``offs[-1]`` are left undefined): torch's grouped GEMM, or a loop where it is missing.
    """
    fn = getattr(nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if fn is not None and _GROUPED_MM.get(x.device.type, True):
        try:
            return fn(x.to(w.dtype), w.transpose(-2, -1), offs=offs)
        except (RuntimeError, NotImplementedError):
            _GROUPED_MM[x.device.type] = False
    y = x.new_zeros((x.shape[0], w.shape[1]))
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            y[start:end] = nn.functional.linear(x[start:end], w[g])
        start = end
    return y


_GROUPED_MM: dict[str, bool] = {}
"""Per device type, False once torch's grouped GEMM refused a call (old GPU, dtype)."""


def _spans(nbytes: int, chunk: int, rows: int) -> list[tuple[int, int]]:
    """Row ranges of about ``chunk`` bytes covering ``rows`` rows of ``nbytes`` bytes."""
    per = max(1, rows * chunk // max(nbytes, 1))
    return [(a, min(a + per, rows)) for a in range(0, rows, per)]


class OffloadedExperts(nn.Module):
    """Drop-in for a fused ``*Experts`` module: same call, experts served by the runtime."""

    def __init__(self, runtime: ExpertOffload, layer: int) -> None:
        super().__init__()
        self.runtime, self.layer = runtime, layer

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """The stock module's call: the experts' weighted sum per token."""
        return self.runtime.run_layer(self.layer, hidden_states, top_k_index, top_k_weights)


