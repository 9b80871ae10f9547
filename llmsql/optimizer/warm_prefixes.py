"""Rule: warm each prefix group's cache before its members are computed.

An engine that runs many requests at once computes the members of a group concurrently,
before their shared prefix is cached, so they all pay for it (a vLLM server on the CPU
with 16 requests in flight reached 41% prefix hits on W4 against a 78% ideal). This rule
cuts the send order into windows and, for every group of two or more prompts in a window,
schedules a *warm-up*: the group's shared prefix alone, sent just before the window with
one output token (answer discarded). The members then find the prefix cached. A window
holds at most ``ctx.batch_size`` prompts, and the prefixes it warms take at most a quarter
of the engine's cache (when the engine reports its size), so they are still cached when
the window runs. The executor sends a window's warm-ups together with the previous
window's last engine call, so they are computed while that window decodes.

Long answers (``max_tokens`` of ``LONG_ANSWER_TOKENS`` or more) hold their KV blocks over
many decode steps: a window's rows then also keep their own KV (the part of the prompt
past the shared prefix, plus the answer) within half the engine's cache. Without this an
engine admits more rows than its cache can grow and preempts (recomputes) them: on an H100
with a 40,000-token cache, 5,000 rows of 48-token answers in 2,048-row calls preempted
about 2,000 times.

A warm-up is sent only where the cost model predicts it saves more prefill than it costs
(:func:`warm_saving`): the members computed together, up to the engine's concurrency, would
each compute the prefix's whole KV blocks; the warm-up computes the whole prefix once, plus
a request. A prefix shorter than one of the engine's blocks cannot be cached, so it is never
warmed (a vLLM server on the CPU chose 128-token blocks: 44 warm-ups planned for 16-token
blocks cost 6,499 tokens on W4's first 150 rows and made the query 13% slower).

Engines that share a prefix between requests of one batch by themselves
(``batch_prefix_sharing``: vLLM caches a prompt's blocks when it schedules them, so a
request scheduled in the same step reuses them) get the windows but no warm-ups: on an H100
with vLLM 0.26, warm-ups left the uncached tokens unchanged and added a request each.

Invariant: the send order and the multiset of prompts are unchanged; only batch bounds and
warm-ups are set. Applies only to backends that cache prefixes across requests
(``prefix_caching``). Assumes ``reorder_prompts`` made groups contiguous.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from llmsql.optimizer.prefix_groups import group_starts, lcp
from llmsql.udfs import REGISTRY

if TYPE_CHECKING:
    from llmsql.backends.base import Capabilities
    from llmsql.optimizer.context import RuleContext
    from llmsql.plan import PromptBatch

CHARS_PER_TOKEN = 4
LONG_ANSWER_TOKENS = 8
"""Answers at least this long make a window's own KV footprint count (see above)."""
REQUEST_TOKENS = 16
"""An extra request's fixed cost in prefill tokens: one decode step at the cost model's
assumed throughputs (40,000 prefill and 2,500 decode tokens/s), request handling aside."""


def warm_saving(shared_chars: int, members: int, caps: Capabilities) -> int:
    """Prefill tokens a warm-up of a ``shared_chars``-character prefix of ``members`` prompts
    is predicted to save (negative: it costs more than it saves).

    Without it, the members the engine computes together (at most ``concurrent_requests``)
    each compute the prefix's cacheable part, its whole KV blocks; with it, the warm-up
    computes the whole prefix once, plus a request, and every member finds those blocks
    cached. An engine that shares a batch's prefix itself computes it once either way.

    >>> from llmsql.backends.base import Capabilities
    >>> caps = Capabilities(prefix_caching=True, block_size=16, concurrent_requests=8)
    >>> warm_saving(400, 4, caps)  # 100 tokens, 96 in whole blocks: 4 x 96 - 100 - 16
    268
    >>> warm_saving(400, 4, dataclasses.replace(caps, block_size=128))  # less than a block
    -116
    >>> warm_saving(400, 4, dataclasses.replace(caps, batch_prefix_sharing=True))
    -20
    """
    tokens = shared_chars // CHARS_PER_TOKEN
    cached = tokens // caps.block_size * caps.block_size
    together = 1 if caps.batch_prefix_sharing else min(members,
                                                         caps.concurrent_requests or members)
    return together * cached - tokens - REQUEST_TOKENS


def warm_prefixes(batch: PromptBatch, ctx: RuleContext, /) -> PromptBatch:  # noqa: C901 - one pass of early exits over the groups
    """Windows of whole groups, each with one warm-up per shared prefix."""
    caps = ctx.capabilities
    if not ctx.warm or not caps.prefix_caching:
        return batch
    answer = batch.call.options.max_tokens or REGISTRY[batch.call.kind].default_max_tokens
    long_answers = answer >= LONG_ANSWER_TOKENS and caps.cache_tokens is not None
    if caps.batch_prefix_sharing and not long_answers:
        return batch  # nothing to warm and nothing to bound
    order = batch.send_order()
    if len(order) < 2:
        return batch
    batch = batch.with_rendered()
    prompts = [batch.prompt(i) for i in order]
    starts = group_starts(prompts, min_shared=caps.block_size * CHARS_PER_TOKEN)
    ends = [*starts[1:], len(order)]
    if all(b - a == 1 for a, b in zip(starts, ends, strict=True)):
        return batch  # (with its prompts rendered: later rules and the executor reuse them)
    cache = caps.cache_tokens or 1 << 62
    budget = cache // 4 * CHARS_PER_TOKEN
    own_budget = cache // 2 if long_answers else 1 << 62
    bounds: list[int] = []
    warmups: list[tuple[int, int]] = []
    size = warm = own = saved = unpaid = 0
    for a, b in zip(starts, ends, strict=True):
        shared = lcp(prompts[a], prompts[a + 1]) if b - a > 1 else 0
        own_kv = [(len(prompts[k]) - shared) // CHARS_PER_TOKEN + answer for k in range(a, b)]
        saving = warm_saving(shared, b - a, caps) if shared else 0
        unpaid += bool(shared) and saving <= 0 and not caps.batch_prefix_sharing
        if not bounds or size + (b - a) > ctx.batch_size or warm + shared > budget \
                or own + sum(own_kv) > own_budget:
            bounds.append(a)
            size = warm = own = 0
        if shared:
            warm += shared  # (computed by the window's first members where not warmed)
            if saving > 0:
                warmups.append((order[a], shared))
                saved += saving
        for k, kv in enumerate(own_kv, a):
            if own and own + kv > own_budget:  # a large group goes on in a new window; its
                bounds.append(k)  # prefix, just computed, is still cached
                size, own, warm = 0, 0, shared
            own += kv
            size += 1
    note = f"warm_prefixes: {len(warmups)} shared prefix(es) warmed in {len(bounds)} window(s)"
    if warmups or unpaid:
        note += (f", predicted to save {saved:,} prefill tokens; {unpaid} not warmed (predicted "
                 f"to cost more than they save: KV blocks of {caps.block_size} tokens, "
                 f"{caps.concurrent_requests or ctx.batch_size} requests at once)")
    return dataclasses.replace(batch, batches=tuple(bounds), warmups=tuple(warmups),
                               notes=(*batch.notes, note))
