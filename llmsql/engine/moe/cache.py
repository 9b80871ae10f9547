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
            slot = next((i for i, s in enumerate(self._slots) if s.state == FREE), None)
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
        candidates = [i for i, s in enumerate(self._slots) if s.state == READY and not s.pins]
        if not candidates:
            return None
        if self.policy == "lru":
            return min(candidates, key=lambda i: self._slots[i].used)
        dist = {i: self._dist_key(i) for i in candidates}
        best = max(candidates, key=lambda i: (dist[i], -self._slots[i].used))
        if incoming is not None and dist[best] <= self._distance_of(incoming):
            return None
        return best

    def _dist_key(self, slot: int) -> int:
        key = self._slots[slot].key
        assert key is not None
        return self._distance_of(key)

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

    def cancel(self, key: Key) -> bool:
        """Drop a loading ``key`` that nobody pinned (a wrong prediction); True if dropped."""
        with self.lock:
            slot = self._where.get(key)
            if slot is None or self._slots[slot].state != LOADING or self._slots[slot].pins:
                return False
            del self._where[key]
            self._slots[slot] = _Slot()
            return True

    def pin(self, slot: int) -> None:
        """``slot`` is in use: never evicted until unpinned."""
        with self.lock:
            self._slots[slot].pins += 1
            self._slots[slot].used = self._next()

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
