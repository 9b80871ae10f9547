"""The cost model behind EXPLAIN: tokens, expected prefix-cache hits, GPU-seconds, dollars.

Expected cached tokens are simulated the way vLLM's prefix cache works: prompts are cut
into blocks of ``block_tokens`` tokens, a block hits only if it and every block before it
are cached, and the cache holds ``cache_tokens`` tokens, evicting the least recently used
block. Blocks are measured in characters (``block_tokens x chars_per_token``) so no
tokenizer is needed; the hit share is then applied to the real (or estimated) token count.

>>> p = ["Q\\n" + "x" * 200 + str(i) for i in range(3)]
>>> hits = simulate_prefix_cache(p, block_chars=64, capacity_blocks=100)
>>> hits  # the 3 shared 64-char blocks hit for the 2nd and 3rd prompt
[0, 192, 192]
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence


@dataclass(frozen=True, slots=True)
class CostModel:
    """Assumed engine figures (override per deployment; EXPLAIN prints them)."""

    block_tokens: int = 16
    """vLLM's KV block size."""
    chars_per_token: float = 4.0
    """Used to turn token blocks into character blocks, and when no tokenizer is at hand."""
    cache_tokens: int = 420_000
    """Prefix-cache capacity (an H100 with an 8B model at 0.85 memory holds about 420k)."""
    prefill_tokens_per_s: float = 40_000.0
    """Prefill throughput (measured for a Llama-3-8B shape on an H100 with vLLM 0.26)."""
    decode_tokens_per_s: float = 2_500.0
    """Aggregate decode throughput at batch sizes batch jobs reach (assumed)."""
    usd_per_m_input: float | None = None
    """Price per million prompt tokens, for priced API models."""
    usd_per_m_output: float | None = None
    """Price per million output tokens, for priced API models."""

    @property
    def block_chars(self) -> int:
        """A KV block in characters."""
        return max(1, round(self.block_tokens * self.chars_per_token))

    @property
    def capacity_blocks(self) -> int:
        """Cache capacity in blocks."""
        return max(1, self.cache_tokens // self.block_tokens)


@dataclass(frozen=True, slots=True)
class CallCost:
    """EXPLAIN's figures for one LLM call."""

    prompts: int
    prompt_tokens: int
    cached_tokens: int
    cached_tokens_table_order: int
    output_tokens: int
    gpu_seconds: float
    usd: float | None
    prompt_tokens_table_order: int = 0
    """Tokens of the distinct prompts in table order with the written field order."""


def simulate_prefix_cache(
    prompts: Sequence[str], *, block_chars: int, capacity_blocks: int
) -> list[int]:
    """Characters of each prompt served from an LRU prefix cache, in send order."""
    lru: OrderedDict[int, None] = OrderedDict()
    touch, evict = lru.move_to_end, lru.popitem  # bound once: this loop runs per block
    hits: list[int] = []
    for prompt in prompts:
        hit, reused = True, 0
        for end in range(block_chars, len(prompt) + 1, block_chars):
            key = hash(prompt[:end])  # a block's identity is its whole prefix, as in vLLM
            if hit and key in lru:
                touch(key)
                reused += block_chars
                continue
            hit = False
            lru[key] = None
            if len(lru) > capacity_blocks:
                evict(last=False)
        hits.append(reused)
    return hits


def expected_cached_tokens(
    prompts: Sequence[str], tokens: Sequence[int], model: CostModel
) -> int:
    """Tokens expected to come from the prefix cache when ``prompts`` are sent in order."""
    hits = simulate_prefix_cache(
        prompts, block_chars=model.block_chars, capacity_blocks=model.capacity_blocks
    )
    return int(sum(t * h / len(p) for p, t, h in zip(prompts, tokens, hits, strict=True) if p))


def call_cost(
    sent: Sequence[str],
    table_order: Sequence[str],
    sent_tokens: Sequence[int],
    table_tokens: Sequence[int],
    output_tokens: int,
    model: CostModel,
) -> CallCost:
    """Figures for one call from its prompts in send order and in table order, each with
    its tokens.
    """
    cached = expected_cached_tokens(sent, sent_tokens, model)
    cached_table = expected_cached_tokens(table_order, table_tokens, model)
    prompt_tokens = sum(sent_tokens)
    gpu = (prompt_tokens - cached) / model.prefill_tokens_per_s + (
        output_tokens / model.decode_tokens_per_s
    )
    usd = None
    if model.usd_per_m_input is not None:
        usd = (prompt_tokens * model.usd_per_m_input
               + output_tokens * (model.usd_per_m_output or 0.0)) / 1e6
    return CallCost(len(sent), prompt_tokens, cached, cached_table, output_tokens, gpu, usd,
                    sum(table_tokens))
