"""``layer_sweep`` with whole-layer copies (after FlexGen's zig-zag schedule).

When a step uses nearly every expert of every layer (large batches, prefill), per-expert
caching only adds overhead: the best plan keeps ``R`` whole layers resident for good and
streams every other layer's experts once per step, one layer ahead, as two bulk copies per
layer (``gate_up[E, 2I, H]`` and ``down[E, H, I]``) into a double buffer. The pool's slots are
laid out as ``R`` resident layers, then two layer buffers; the copy of the next streamed layer
is issued on the copy stream when a layer starts, after the compute that last read its
buffer, so it overlaps this layer's compute (and any resident layers in between).

Needs room for two layers (``slots >= 2·E``); below that the runtime sweeps expert by expert.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from collections.abc import Callable


class LayerSweep:
    """The whole-layer sweep over a runtime's slot pool (see the module docstring)."""

    def __init__(self, *, layers: tuple[int, ...], experts: int, slots: int,
                 pool: tuple[torch.Tensor, torch.Tensor],
                 host: dict[int, tuple[torch.Tensor, torch.Tensor]],
                 copy_stream: Any, device: torch.device) -> None:
        self.layers, self.experts, self.pool, self.host = layers, experts, pool, host
        self.copy_stream, self.device = copy_stream, device
        count = min(max(slots // experts - 2, 0), len(layers))
        # resident layers spread evenly, so streamed copies overlap their compute
        picks = sorted({round(i * len(layers) / count) for i in range(count)}) if count else []
        self.resident = {layers[i]: n * experts for n, i in enumerate(picks)}
        base = len(self.resident) * experts
        self.buffers = (base, base + experts)
        self.streamed = [x for x in layers if x not in self.resident]
        self.reset()

    @staticmethod
    def fits(slots: int, experts: int) -> bool:
        """Whether ``slots`` hold the double buffer."""
        return slots >= 2 * experts

    def reset(self) -> None:
        """Forget what the pool holds (the runtime switched plans)."""
        self.loaded: set[int] = set()
        self.in_buffer: dict[int, int] = {}
        """streamed layer -> buffer index, for layers whose copy has been issued"""
        self.ready: dict[int, Any] = {}
        """layer -> CUDA event after its copy"""
        self.last_use: dict[int, Any] = {}
        """buffer index -> CUDA event after the compute that read it"""
        self._next_buffer = 0

    def layer_bytes(self, layer: int) -> int:
        """Bytes of one layer's experts."""
        gate_up, down = self.host[layer]
        return gate_up.numel() * gate_up.element_size() + down.numel() * down.element_size()

    def base(self, layer: int, count: Callable[..., None]) -> tuple[int, bool]:
        """The first slot of ``layer``'s experts, copying it now if it is not there or on its
        way; and whether it was (a hit). Also issues the next streamed layer's copy.
        """
        hit = layer in self.loaded or layer in self.in_buffer
        if layer in self.resident:
            if layer not in self.loaded:
                self._copy(layer, self.resident[layer], None, count)
                self.loaded.add(layer)
            base = self.resident[layer]
        else:
            if layer not in self.in_buffer:
                self._stream(layer, count)
            base = self.buffers[self.in_buffer[layer]]
        self._wait(layer)
        following = self._next_streamed(layer)
        if following != layer:
            self._stream(following, count)  # one layer ahead, across steps too
        return base, hit

    def _next_streamed(self, layer: int) -> int:
        i = self.layers.index(layer)
        for j in range(1, len(self.layers) + 1):
            candidate = self.layers[(i + j) % len(self.layers)]
            if candidate in self.streamed:
                return candidate
        return layer

    def _stream(self, layer: int, count: Callable[..., None]) -> None:
        if layer in self.in_buffer or not self.streamed:
            return
        buf = self._next_buffer
        self._next_buffer = 1 - buf
        for other, b in list(self.in_buffer.items()):
            if b == buf:
                del self.in_buffer[other]
        self.in_buffer[layer] = buf
        self._copy(layer, self.buffers[buf], self.last_use.get(buf), count)

    def _copy(self, layer: int, base: int, after: Any, count: Callable[..., None]) -> None:
        gate_up, down = self.host[layer]
        dst = (self.pool[0][base:base + self.experts], self.pool[1][base:base + self.experts])
        if self.copy_stream is None:
            dst[0].copy_(gate_up)
            dst[1].copy_(down)
        else:
            with torch.cuda.stream(self.copy_stream):
                if after is not None:
                    self.copy_stream.wait_event(after)
                dst[0].copy_(gate_up, non_blocking=True)
                dst[1].copy_(down, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.copy_stream)
            self.ready[layer] = event
        count(bytes_h2d=self.layer_bytes(layer), prefetched=self.experts)

    def _wait(self, layer: int) -> None:
        event = self.ready.pop(layer, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def used(self, layer: int) -> None:
        """The layer's compute is enqueued: its buffer may be overwritten after it."""
        if layer in self.in_buffer and self.copy_stream is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.last_use[self.in_buffer[layer]] = event
