"""Expert offload (issue 15): offloaded outputs equal the stock model's for every plan,
predictor and cache size, on tiny fp32 models of each supported family; bookkeeping holds;
bad input gets a ConfigError."""

from __future__ import annotations

import random
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from llmsql.engine import Engine, Job, from_config  # noqa: E402
from llmsql.engine.moe import (  # noqa: E402
    NextRouter,
    NoPredictor,
    Oracle,
    SlotTable,
    check_moe_model,
    offload_experts,
)
from llmsql.errors import ConfigError  # noqa: E402
from llmsql.moe import MoEOptions  # noqa: E402
from tests.engine.moe.conftest import FAMILIES, moe_config  # noqa: E402

PLANS = ("lru", "predictive", "layer_sweep", "auto")
IDS = [tuple(random.Random(i).randrange(3, 96) for _ in range(5 + 3 * i)) for i in range(4)]


def _ids() -> Any:
    return torch.tensor([list(IDS[3][:11]), list(IDS[2][:11])])


def _stock(family: str) -> Any:
    return from_config(moe_config(family), seed=7)


def _offloaded(family: str, cache: float | int, plan: str, predictor: str = "auto",
               **kw: Any) -> tuple[Any, Any]:
    model = _stock(family)
    runtime = offload_experts(model, MoEOptions(expert_cache=cache, plan=plan,
                                                predictor=predictor), device="cpu", **kw)
    return model, runtime


def _greedy(model: Any) -> list[tuple[int, ...]]:
    engine = Engine(model, eos=[2], pad=0, batch_size=3)
    out = engine.run([Job(i, ids, budget=6, ignore_eos=True) for i, ids in enumerate(IDS)])
    return [o.tokens for o in out]  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def reference() -> dict[str, tuple[Any, list[tuple[int, ...]]]]:
    out = {}
    for family in FAMILIES:
        model = _stock(family)
        with torch.no_grad():
            logits = model(_ids()).logits
        out[family] = (logits, _greedy(model))
    return out


def _slot_bytes(family: str) -> int:
    cfg = moe_config(family)
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    return 3 * cfg.hidden_size * inter * 4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("cache", ["top_k", 0.4, 1.0])
def test_offloaded_outputs_equal_stock(reference: Any, family: str, plan: str,
                                       cache: Any) -> None:
    size = 2 * _slot_bytes(family) if cache == "top_k" else cache  # top-k = 2 slots
    model, runtime = _offloaded(family, size, plan, predictor="next_router")
    try:
        want_logits, want_tokens = reference[family]
        with torch.no_grad():
            got = model(_ids()).logits
        assert (got - want_logits).abs().max().item() < 1e-5
        assert _greedy(model) == want_tokens
        runtime.check()
        stats = runtime.stats()
        assert stats.needed > 0 and stats.steps > 0
        if cache == 1.0 and plan != "lru":
            assert stats.hit_rate > 0.5  # experts stay once loaded
    finally:
        runtime.close()


@pytest.mark.parametrize("predictor", ["none", "next_router", "oracle", "oracle_noisy"])
def test_every_predictor_gives_the_stock_outputs(reference: Any, predictor: str) -> None:
    family = "olmoe"
    model, runtime = _offloaded(family, 0.5, "predictive", predictor="next_router")
    runtime.route_log = []
    with torch.no_grad():
        model(_ids())
    log = runtime.route_log
    runtime.close()
    pred: Any = {"none": NoPredictor(), "next_router": None}.get(predictor) or Oracle(
        log, num_experts=8, error_rate=0.3 if predictor == "oracle_noisy" else 0.0)
    model = _stock(family)
    kwargs = {} if pred is None else {"predictor": pred}
    runtime = offload_experts(model, MoEOptions(expert_cache=0.5, plan="predictive",
                                                predictor="next_router"),
                              device="cpu", **kwargs)
    try:
        with torch.no_grad():
            got = model(_ids()).logits
        assert (got - reference[family][0]).abs().max().item() < 1e-5
        stats = runtime.stats()
        if predictor == "oracle":  # the true experts, fetched ahead: every later layer hits
            first = runtime.layers[0]
            later = [n for layer, n in log if layer != first]
            assert stats.prefetch_used >= sum(len(x) for x in later) - stats.hits
            assert stats.hit_rate > 0.7
        if predictor == "none":
            assert stats.prefetched == 0
    finally:
        runtime.close()


def test_auto_switches_to_layer_sweep_for_large_steps() -> None:
    from llmsql.moe.plan import Hardware

    slow_link = Hardware(h2d_bytes_per_s=1e6, layer_overhead_s=0.0)  # bytes dominate
    model, runtime = _offloaded("olmoe", 0.5, "auto", predictor="next_router",
                                hardware=slow_link)
    try:
        big = torch.randint(3, 96, (8, 40), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            model(big)
        assert dict(runtime.stats().plans) == {"layer_sweep": 1}
        assert runtime.estimate(1).plan in {"predictive", "lru"}
    finally:
        runtime.close()


def test_slot_table_never_evicts_a_pinned_or_loading_expert() -> None:
    rng = random.Random(0)
    table = SlotTable(5, layers=(0, 1, 2, 3), policy="cyclic")
    pinned: dict[int, int] = {}
    for step in range(3000):
        table.now(rng.choice((0, 1, 2, 3)))
        key = (rng.randrange(4), rng.randrange(8))
        op = rng.random()
        if op < 0.5 and table.lookup(key) is None:
            before = {s: table.key(s) for s in range(5)}
            got = table.reserve(key, prefetch=rng.random() < 0.5)
            if got is not None:
                slot, evicted = got
                assert slot not in pinned, f"step {step}: pinned slot {slot} reused"
                assert evicted is None or before[slot] == evicted
        elif op < 0.7:
            slot = table.lookup(key)
            if slot is not None and table.state(slot) == "loading":
                table.mark_ready(slot)
        elif op < 0.85:
            slot = table.lookup(key)
            if slot is not None and table.state(slot) == "ready":
                table.pin(slot)
                pinned[slot] = pinned.get(slot, 0) + 1
        elif pinned:
            slot = rng.choice(sorted(pinned))
            table.unpin(slot)
            pinned[slot] -= 1
            if not pinned[slot]:
                del pinned[slot]
        else:
            table.cancel(key)
        table.check()


def test_lru_and_cyclic_choose_their_victims() -> None:
    lru = SlotTable(2, layers=(0, 1, 2), policy="lru")
    for key in ((0, 0), (1, 0)):
        slot, _ = lru.reserve(key)  # type: ignore[misc]
        lru.mark_ready(slot)
    lru.pin(0)
    lru.unpin(0)  # (0, 0) used last
    assert lru.reserve((2, 0)) == (1, (1, 0))
    lru.pin(0)
    lru.mark_ready(1)
    lru.pin(1)
    assert lru.reserve((2, 1)) is None  # every slot in use: nothing evicted
    with pytest.raises(ValueError, match="unpinned more often"):
        SlotTable(1, layers=(0,)).unpin(0)


def test_a_cache_below_top_k_names_the_minimum() -> None:
    with pytest.raises(ConfigError, match=r"fewer than one layer's top-k \(2\).*at least 2"):
        _offloaded("mixtral", _slot_bytes("mixtral"), "lru")


def test_dense_and_unfused_models_are_refused() -> None:
    from tests.engine.conftest import llama_config

    with pytest.raises(ConfigError, match="dense model.*drop them"):
        offload_experts(from_config(llama_config(), seed=0), MoEOptions(expert_cache=0.5),
                        device="cpu")
    model = _stock("mixtral")
    model.model.layers[0].mlp.experts = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    with pytest.raises(ConfigError, match="not in transformers 5's fused experts layout"):
        check_moe_model(model)


def test_next_router_scores_count_tokens() -> None:
    model = _stock("olmoe")
    routers = {i: model.model.layers[i].mlp.gate.weight for i in range(4)}
    pred = NextRouter(routers, top_k=2)
    hidden = torch.randn(5, 32)
    out = pred.predict(1, hidden, torch.zeros(5, 2, dtype=torch.long), 2)
    assert sorted(out) == [2, 3]
    assert all(v.shape == (8,) and v.sum().item() == 10 for v in out.values())
    assert pred.predict(3, hidden, torch.zeros(5, 2, dtype=torch.long), 2) == {}


def test_layer_sweep_streams_whole_layers_once_per_step() -> None:
    model, runtime = _offloaded("olmoe", 0.5, "layer_sweep")  # 16 slots: 2 layer buffers
    try:
        assert runtime._sweep is not None and not runtime._sweep.resident
        layer_bytes = runtime._sweep.layer_bytes(0)
        with torch.no_grad():
            model(_ids())
            runtime.reset_stats()
            got = model(_ids()).logits
        stats = runtime.stats()
        assert stats.bytes_h2d == 4 * layer_bytes  # every layer once, in two big copies
        assert stats.prefetched == 4 * 8 and stats.plans == (("layer_sweep", 1),)
        model2, runtime2 = _offloaded("olmoe", 0.75, "layer_sweep")  # one layer stays
        with torch.no_grad():
            model2(_ids())
            runtime2.reset_stats()
            assert (model2(_ids()).logits - got).abs().max().item() < 1e-5
        assert len(runtime2._sweep.resident) == 1
        assert runtime2.stats().bytes_h2d == 3 * layer_bytes
        runtime2.close()
    finally:
        runtime.close()


def test_auto_tries_each_plan_then_keeps_the_fastest_measured() -> None:
    model, runtime = _offloaded("olmoe", 0.5, "auto", predictor="next_router")
    try:
        ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            for _ in range(12):  # same-size steps: one bucket
                model(ids)
        plans = dict(runtime.stats().plans)
        assert set(plans) == {"layer_sweep", "predictive", "lru"}  # every candidate tried
        measured = {p: runtime.trials.times(6, p) for p in plans}
        assert all(len(t) >= 2 for t in measured.values())
        import statistics

        fastest = min(measured, key=lambda p: statistics.median(measured[p]))
        assert runtime.trials.choose(6, "lru") == fastest
        assert runtime.plan == fastest  # the last steps ran it
    finally:
        runtime.close()
