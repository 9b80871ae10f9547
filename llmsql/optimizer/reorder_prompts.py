"""Rule: choose the row send order and, per row, the field order for prefix-cache reuse.

Invariant: the multiset of (row, field -> value) is unchanged: each row's prompt holds the
same instruction and the same ``name: value`` lines, possibly in another order; a template
with ``{placeholders}`` keeps its field order (rows may still move). The answers the query
returns never depend on this rule: the final query reads answers by input value, and a user
ORDER BY is applied by the engine afterwards. Assumes ``dedup_prompts`` ran first, so only
representatives are ordered. The choices depend on the set of distinct rows, not on their
order in the input.

Where the rules see only part of a call's rows (a Spark partition), ``ctx.pinned`` carries the
field orders this rule chose over the call's whole input: every row keeps its pinned order,
so its prompt is the one it gets on DuckDB, and only the rows are ordered (by prompt, which
keeps each shared prefix's prompts together).

>>> from llmsql.optimizer._doctest import batch_of
>>> from llmsql.optimizer.context import RuleContext
>>> from llmsql.optimizer.context import PinnedFieldOrders
>>> part = batch_of([["x", "y"], ["1", "1"]])
>>> pins = PinnedFieldOrders.of("doc", [(("x", "1"), (1, 0)), (("y", "1"), (0, 1))])
>>> out = reorder_prompts(part, RuleContext(pinned=pins))
>>> [out.prompt(i) for i in out.send_order()]
['Q\\nf0: y\\nf1: 1\\n', 'Q\\nf1: 1\\nf0: x\\n']
"""

from __future__ import annotations

import dataclasses
import operator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmsql.optimizer.context import RuleContext
    from llmsql.plan import PromptBatch


def reorder_prompts(batch: PromptBatch, ctx: RuleContext, /) -> PromptBatch:
    """Order representatives with :func:`llmsql.optimizer.ordering.solve`, or keep the
    field orders pinned in ``ctx`` and order the rows only.
    """
    from llmsql.optimizer.ordering import solve

    reps = batch.send_order()
    if not ctx.reorder or not reps:
        return batch
    # the solver sees the rows in one canonical order (by their values), so the field order
    # it gives a row, and so the row's prompt and answer, depend on the set of distinct rows
    # only: never on the table's row order, the engine or the batch sizes
    rows = list(zip(*batch.values, strict=False)) if batch.values else [()] * batch.n_rows
    reps = tuple(sorted(reps, key=rows.__getitem__))
    template = batch.call.template
    pinned, missing = _pinned_orders(batch, ctx, reps)
    if pinned is not None:  # even one row: the whole input may have given it another order
        return _keep_pinned(batch, reps, pinned)
    if len(reps) < 2:
        return batch
    if not template.appended:
        # every field is a placeholder: the order inside the prompt is the user's; sorting
        # the prompts is a depth-first walk of their prefix trie (shared prefixes together)
        order = tuple(sorted(reps, key=batch.prompt))
        note = f"reorder_prompts: {len(order)} prompts sorted (fields fixed by placeholders)"
        return dataclasses.replace(batch, order=order, notes=(*batch.notes, note),
                                   rendered=None)
    pick = operator.itemgetter(*reps)  # len(reps) >= 2: a tuple per column
    cols = [pick(batch.values[j]) for j in template.appended]
    sol = solve(
        cols,
        [template.fields[j] for j in template.appended],
        instruction=template.instruction,
        # an adapter was trained on prompts with the written field order: keep it
        fixed_fields=(template.order_is_fixed or len(cols) < 2
                      or batch.call.options.adapter is not None),
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
        notes=(*batch.notes, *missing, note), rendered=None,
    )


def _pinned_orders(batch: PromptBatch, ctx: RuleContext, reps: tuple[int, ...],
                   ) -> tuple[list[tuple[int, ...]] | None, tuple[str, ...]]:
    """Each representative's pinned field order, or None (and why, when some rows of a
    pinned call are not pinned: then the orders are chosen over this batch's rows).
    """
    pins = ctx.pinned
    if pins is None or pins.call_id != batch.call.id:
        return None, ()
    found = pins.lookup([tuple(col[i] for col in batch.values) for i in reps])
    orders = [order for order in found if order is not None]
    if len(orders) < len(found):
        return None, (f"reorder_prompts: {len(found) - len(orders)} of {len(found)} rows "
                      "had no pinned field order; field orders chosen over this batch's rows",)
    return orders, ()


def _keep_pinned(batch: PromptBatch, reps: tuple[int, ...],
                 orders: list[tuple[int, ...]]) -> PromptBatch:
    """``batch`` with each representative's field order ``orders[k]``, rows sorted by prompt."""
    field_orders = tuple(sorted(set(orders)))
    index = {order: k for k, order in enumerate(field_orders)}
    per_row = [0] * batch.n_rows
    for i, order in zip(reps, orders, strict=True):
        per_row[i] = index[order]
    if batch.rep is not None:
        per_row = [per_row[batch.rep[i]] for i in range(batch.n_rows)]
    pinned = dataclasses.replace(batch, field_orders=field_orders,
                                 row_field_order=tuple(per_row), rendered=None)
    order = tuple(sorted(reps, key=pinned.prompt))
    note = (f"reorder_prompts: {len(order)} prompts reordered, {len(field_orders)} distinct "
            "field order(s), as chosen over the call's whole input")
    return dataclasses.replace(pinned, order=order, notes=(*batch.notes, note))
