"""Rule: warm each prefix group's cache before fanning its other members out.

An engine serving many requests at once computes the members of a group concurrently,
before their shared prefix is cached, so they all pay for it (a vLLM server on the CPU
with 16 requests in flight reached 41% prefix hits on W4 against a 78% ideal). This rule
rewrites the send order into waves: for each window of groups, first one *leader* per group
(alone in its batch), then every other member; the leaders' prefixes are then cached when
the members arrive. A window holds at most ``ctx.batch_size`` prompts so the warmed
prefixes are still in the cache when their members are computed.

Invariant: the multiset of prompts is unchanged (only their order and batch bounds
change); members of a group stay contiguous. Applies only to backends that cache prefixes
across requests but compute a batch's requests concurrently
(``prefix_caching and not batch_prefix_sharing``). Assumes ``reorder_prompts`` made groups
contiguous.
"""

from __future__ import annotations

import dataclasses

from llmsql.optimizer.context import RuleContext
from llmsql.optimizer.prefix_groups import group_starts
from llmsql.plan import PromptBatch


def warm_prefixes(batch: PromptBatch, ctx: RuleContext, /) -> PromptBatch:
    """Leaders first, then members, window by window."""
    caps = ctx.capabilities
    if not caps.prefix_caching or caps.batch_prefix_sharing:
        return batch
    order = batch.send_order()
    prompts = [batch.prompt(i) for i in order]
    starts = group_starts(prompts, min_shared=caps.block_size * 4)
    groups = [list(order[a:b]) for a, b in zip(starts, [*starts[1:], len(order)], strict=True)]
    if all(len(g) == 1 for g in groups):
        return batch
    new_order: list[int] = []
    bounds: list[int] = []
    window: list[list[int]] = []
    for group in [*groups, []]:
        if group and sum(map(len, window)) + len(group) <= ctx.batch_size:
            window.append(group)
            continue
        _flush(window, new_order, bounds)
        window = [group] if group else []
    warmed = sum(1 for g in groups if len(g) > 1)
    note = f"warm_prefixes: {warmed} group leader(s) sent ahead of their members"
    return dataclasses.replace(batch, order=tuple(new_order), batches=tuple(bounds),
                               notes=(*batch.notes, note))


def _flush(window: list[list[int]], order: list[int], bounds: list[int]) -> None:
    if not window:
        return
    leaders = [g[0] for g in window if len(g) > 1]
    rest = [i for g in window for i in (g[1:] if len(g) > 1 else g)]
    for wave in (leaders, rest):
        if wave:
            bounds.append(len(order))
            order.extend(wave)
