"""Rule: choose the row send order and, per row, the field order for prefix-cache reuse.

Invariant: the multiset of (row, field -> value) is unchanged: each row's prompt holds the
same instruction and the same ``name: value`` lines, possibly in another order; a template
with ``{placeholders}`` keeps its field order (rows may still move). The answers the query
returns never depend on this rule: the final query reads answers by input value, and a user
ORDER BY is applied by the engine afterwards. Assumes ``dedup_prompts`` ran first, so only
representatives are ordered. The choices depend on the set of distinct rows, not on their
order in the input.
"""

from __future__ import annotations

import dataclasses

from llmsql.optimizer.context import RuleContext
from llmsql.plan import PromptBatch


def reorder_prompts(batch: PromptBatch, ctx: RuleContext, /) -> PromptBatch:
    """Order representatives with :func:`llmsql.optimizer.ordering.solve`."""
    from llmsql.optimizer.ordering import solve

    reps = batch.send_order()
    if not ctx.reorder or len(reps) < 2:
        return batch
    # the solver sees the rows in one canonical order (by their values), so the field order
    # it gives a row, and so the row's prompt and answer, depend on the set of distinct rows
    # only: never on the table's row order, the engine or the batch sizes
    reps = tuple(sorted(reps, key=lambda i: tuple(col[i] for col in batch.values)))
    template = batch.call.template
    if not template.appended:
        # every field is a placeholder: the order inside the prompt is the user's; sorting
        # the prompts is a depth-first walk of their prefix trie (shared prefixes together)
        order = tuple(sorted(reps, key=batch.prompt))
        note = f"reorder_prompts: {len(order)} prompts sorted (fields fixed by placeholders)"
        return dataclasses.replace(batch, order=order, notes=(*batch.notes, note),
                                   rendered=None)
    cols = [[batch.values[j][i] for i in reps] for j in template.appended]
    sol = solve(
        cols,
        [template.fields[j] for j in template.appended],
        instruction=template.instruction,
        fixed_fields=template.order_is_fixed or len(cols) < 2,
        capacity_blocks=ctx.cache_blocks,
    )
    order = tuple(reps[k] for k in sol.rows)
    appended = template.appended
    field_orders = tuple(tuple(appended[j] for j in fo) for fo in sol.field_orders)
    per_row = [0] * batch.n_rows
    for position, local in enumerate(sol.rows):  # row_field_order is per sent position
        per_row[reps[local]] = sol.row_field_order[position]
    if batch.rep is not None:
        per_row = [per_row[batch.rep[i]] for i in range(batch.n_rows)]
    note = (
        f"reorder_prompts: {len(order)} prompts reordered, "
        f"{len(field_orders)} distinct field order(s)"
    )
    return dataclasses.replace(
        batch, order=order, field_orders=field_orders, row_field_order=tuple(per_row),
        notes=(*batch.notes, note), rendered=None,
    )
