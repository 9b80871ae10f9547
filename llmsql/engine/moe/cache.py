"""The expert slot table: which expert sits in which GPU slot (bookkeeping only, no tensors).

Keys are ``(layer, expert)``. A slot is *free*, *loading* (a copy is queued or in flight) or
*ready*. A slot is *pinned* while a layer computes with it; pinned and loading slots are
never evicted, so a running expert is never overwritten. Thread-safe: the compute thread
reserves and pins, the copy thread marks slots ready.

Two eviction policies:

- ``lru``: the least recently used ready slot (the reactive baseline);
- ``cyclic``: the expert whose layer comes round last after the current one (Belady's choice
  when layers run in a fixed cycle), least recently used first among equals; the running
  layer's own experts go last. A prefetch may only evict an expert needed later than the one
  it brings.

>>> table = SlotTable(2, layers=(0, 1, 2), policy="cyclic")
>>> table.reserve((0, 5)), table.reserve((1, 3))
((0, None), (1, None))
>>> table.mark_ready(0), table.mark_ready(1)
(None, None)
>>> table.now(1)  # layer 1 runs
>>> table.reserve((2, 7), prefetch=True)  # layer 0 comes round last: evict (0, 5)
(0, (0, 5))
>>> table.reserve((0, 1), prefetch=True) is None  # nothing is needed later than layer 0
True
"""

from __future__ import annotations

import heapq
import threading
from dataclasses import dataclass

Key = tuple[int, int]

FREE, LOADING, READY = "free", "loading", "ready"
POLICIES = ("lru", "cyclic")


@dataclass(slots=True)
class _Slot:
    key: Key | None = None
    state: str = FREE
    pins: int = 0
    used: int = 0


class SlotTable:
    """``slots`` expert slots over MoE ``layers`` (model layer indices, in run order)."""

    def __init__(self, slots: int, *, layers: tuple[int, ...], policy: str = "lru") -> None:
        if policy not in POLICIES:
            msg = f"unknown eviction policy {policy!r}; use one of {POLICIES}"
            raise ValueError(msg)
        self._slots = [_Slot() for _ in range(slots)]
        self._where: dict[Key, int] = {}
        self._order = {layer: i for i, layer in enumerate(layers)}
        self._layers = tuple(layers)
        self._free = list(range(slots))
        """heap of free slot indices (the lowest is taken first)"""
        self._ready: dict[int, list[tuple[int, int]]] = {layer: [] for layer in layers}
        """per layer, a heap of (used, slot) of its ready slots; entries go stale when a slot
        is used again, evicted or cancelled, and are dropped lazily (no scan of every slot)"""
        self.policy = policy
        self.current = layers[0] if layers else 0
        self._tick = 0
        self.lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._slots)

    def now(self, layer: int) -> None:
        """The layer now computing (the ``cyclic`` policy measures distances from it)."""
        with self.lock:
            self.current = layer

    def distance(self, layer: int) -> int:
        """Layers until ``layer`` runs next, counting from the current one (0: it is running)."""
        n = len(self._order)
        return (self._order[layer] - self._order[self.current]) % n

    def lookup(self, key: Key) -> int | None:
        """The slot holding or loading ``key``, or None."""
        with self.lock:
            return self._where.get(key)

    def state(self, slot: int) -> str:
        """The state of ``slot``: free, loading or ready."""
        with self.lock:
            return self._slots[slot].state

    def key(self, slot: int) -> Key | None:
        """The expert in ``slot`` (None when free)."""
        with self.lock:
            return self._slots[slot].key

    def resident(self) -> list[Key]:
        """Keys loading or ready, in slot order."""
        with self.lock:
            return [s.key for s in self._slots if s.key is not None]

    def reserve(self, key: Key, *, prefetch: bool = False) -> tuple[int, Key | None] | None:
        """A slot for ``key`` (marked loading): a free one, else an evicted victim's.

        Returns:
            (slot, evicted key or None); None when no slot can be taken (all pinned or
            loading, or, for a prefetch, every victim is needed sooner than ``key``).
        """
        with self.lock:
            if key in self._where:
                msg = f"expert {key} already has slot {self._where[key]}"
                raise ValueError(msg)
            slot = heapq.heappop(self._free) if self._free else None
            evicted = None
            if slot is None:
                slot = self._victim(key if prefetch else None)
                if slot is None:
                    return None
                evicted = self._slots[slot].key
                del self._where[evicted]  # type: ignore[arg-type]
            self._slots[slot] = _Slot(key=key, state=LOADING, used=self._next())
            self._where[key] = slot
            return slot, evicted

    def _victim(self, incoming: Key | None) -> int | None:
        """The ready, unpinned slot to evict: ``lru``, the least recently used; ``cyclic``,
        the least recently used of the layer that runs last from now (None if a prefetch's
        ``incoming`` expert is needed no sooner than that).
        """
        if self.policy == "lru":
            tops = [t for t in (self._oldest(layer) for layer in self._layers) if t is not None]
            return min(tops)[1] if tops else None
        n = len(self._layers)
        start = self._order[self.current]
        for step in range(n - 1, -1, -1):  # the layer that runs last first
            layer = self._layers[(start + step) % n]
            top = self._oldest(layer)
            if top is not None:
                if incoming is not None and step <= self._distance_of(incoming):
                    return None
                return top[1]
        return None

    def _oldest(self, layer: int) -> tuple[int, int] | None:
        """``layer``'s least recently used ready, unpinned slot as (used, slot), or None."""
        heap, pinned, found = self._ready.get(layer, []), [], None
        while heap:
            used, slot = heap[0]
            s = self._slots[slot]
            if s.state != READY or s.used != used or s.key is None or s.key[0] != layer:
                heapq.heappop(heap)  # stale
            elif s.pins:
                pinned.append(heapq.heappop(heap))
            else:
                found = (used, slot)
                break
        for entry in pinned:
            heapq.heappush(heap, entry)
        return found

    def _ready_entry(self, slot: int) -> None:
        s = self._slots[slot]
        if s.state == READY and s.key is not None and s.key[0] in self._ready:
            heapq.heappush(self._ready[s.key[0]], (s.used, slot))

    def _distance_of(self, key: Key) -> int:
        return self.distance(key[0])  # the running layer's own: 0, evicted last

    def mark_ready(self, slot: int, key: Key | None = None) -> None:
        """The copy of ``key`` into ``slot`` has been issued in full (ignored when ``key`` no
        longer owns the slot: a prediction cancelled while its copy was issued).
        """
        with self.lock:
            if key is not None and self._slots[slot].key != key:
                return
            self._slots[slot].state = READY
            self._ready_entry(slot)

    def cancel(self, key: Key) -> bool:
        """Drop a loading ``key`` that nobody pinned (a wrong prediction); True if dropped."""
        with self.lock:
            slot = self._where.get(key)
            if slot is None or self._slots[slot].state != LOADING or self._slots[slot].pins:
                return False
            del self._where[key]
            self._slots[slot] = _Slot()
            heapq.heappush(self._free, slot)
            return True

    def pin(self, slot: int) -> None:
        """``slot`` is in use: never evicted until unpinned."""
        with self.lock:
            self._slots[slot].pins += 1
            self._slots[slot].used = self._next()
            self._ready_entry(slot)

    def unpin(self, slot: int) -> None:
        """Undo one :meth:`pin`."""
        with self.lock:
            if self._slots[slot].pins <= 0:
                msg = f"slot {slot} unpinned more often than pinned"
                raise ValueError(msg)
            self._slots[slot].pins -= 1

    def _next(self) -> int:
        self._tick += 1
        return self._tick

    def check(self) -> None:
        """Raise AssertionError if the table is inconsistent (tests call this)."""
        with self.lock:
            keys = [s.key for s in self._slots if s.key is not None]
            assert len(keys) == len(set(keys)), f"an expert in two slots: {keys}"
            assert len(keys) == len(self._where), "slot map and slots disagree"
            for key, slot in self._where.items():
                assert self._slots[slot].key == key, f"{key} maps to slot {slot}"
            for i, s in enumerate(self._slots):
                assert s.pins >= 0, f"slot {i} has negative pins"
                assert (s.key is None) == (s.state == FREE), f"slot {i}: {s}"
                assert not (s.pins and s.state == FREE), f"free slot {i} is pinned"
