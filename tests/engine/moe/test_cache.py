"""The slot table's victim search (heaps, no scan) against the documented rule, brute force;
and the grouped expert computation against a plain per-expert loop."""

from __future__ import annotations

import random

import pytest
import torch

from llmsql.engine.moe.cache import READY, SlotTable
from llmsql.engine.moe.offload import _grouped_linear, grouped_experts


def brute_victim(table: SlotTable, incoming: tuple[int, int] | None) -> int | None:
    """The rule in cache.py's docstring, over every slot."""
    slots = table._slots
    candidates = [i for i, s in enumerate(slots) if s.state == READY and not s.pins]
    if not candidates:
        return None
    if table.policy == "lru":
        return min(candidates, key=lambda i: slots[i].used)
    best = max(candidates, key=lambda i: (table.distance(slots[i].key[0]), -slots[i].used))
    if incoming is not None and table.distance(slots[best].key[0]) <= table.distance(
            incoming[0]):
        return None
    return best


@pytest.mark.parametrize("policy", ["lru", "cyclic"])
def test_victims_match_brute_force_over_random_operations(policy: str) -> None:
    rng = random.Random(7)
    layers = (0, 1, 2, 3)
    table = SlotTable(6, layers=layers, policy=policy)
    checked = 0
    for _ in range(3000):
        op = rng.random()
        key = (rng.choice(layers), rng.randrange(8))
        if op < 0.15:
            table.now(rng.choice(layers))
        elif op < 0.55 and table.lookup(key) is None:
            prefetch = rng.random() < 0.5
            want = brute_victim(table, key if prefetch else None)
            free = any(s.key is None for s in table._slots)
            got = table.reserve(key, prefetch=prefetch)
            if not free:
                assert (got[0] if got else None) == want
                checked += 1
        elif op < 0.75:
            loading = [i for i, s in enumerate(table._slots) if s.state == "loading"]
            if loading:
                slot = rng.choice(loading)
                table.mark_ready(slot, table.key(slot))
        elif op < 0.85:
            ready = [i for i, s in enumerate(table._slots) if s.state == READY]
            if ready:
                slot = rng.choice(ready)
                table.pin(slot)
                if rng.random() < 0.7:
                    table.unpin(slot)
        elif op < 0.9:
            pinned = [i for i, s in enumerate(table._slots) if s.pins]
            if pinned:
                table.unpin(rng.choice(pinned))
        else:
            table.cancel(key)
        table.check()
    assert checked > 200


def test_grouped_experts_equal_a_per_expert_loop() -> None:
    torch.manual_seed(0)
    slots, hidden, inter, tokens, k = 7, 16, 12, 9, 3
    pool = (torch.randn(slots, 2 * inter, hidden), torch.randn(slots, hidden, inter))
    x = torch.randn(tokens, hidden)
    slot_of = torch.randint(0, slots + 1, (tokens, k))  # slots: left out
    weights = torch.rand(tokens, k)
    got = torch.zeros_like(x)
    grouped_experts(pool, slot_of, x, weights, got, torch.nn.functional.silu)
    want = torch.zeros_like(x)
    for t in range(tokens):
        for j in range(k):
            s = int(slot_of[t, j])
            if s < slots:
                gate, up = (pool[0][s] @ x[t]).chunk(2)
                want[t] += weights[t, j] * (pool[1][s] @ (torch.nn.functional.silu(gate) * up))
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-5)
    assert (slot_of == slots).any() and (got != 0).all()


def test_the_grouped_gemm_loop_fallback_equals_torch_grouped_mm() -> None:
    torch.manual_seed(1)
    w = torch.randn(4, 5, 6)
    x = torch.randn(8, 6)
    offs = torch.tensor([2, 2, 6, 7], dtype=torch.int32)
    fast = _grouped_linear(x, w, offs)
    import llmsql.engine.moe.offload as off

    saved = off._GROUPED_MM
    off._GROUPED_MM = {"cpu": False}
    try:
        slow = _grouped_linear(x, w, offs)
    finally:
        off._GROUPED_MM = saved
    assert torch.allclose(fast[:7], slow[:7], atol=1e-5)
    assert torch.allclose(slow[2:6], x[2:6] @ w[2].T, atol=1e-5)
