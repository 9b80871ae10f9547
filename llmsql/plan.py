"""The logical plan: LLM calls pulled out of the query as typed, explicit steps.

A :class:`QueryPlan` holds the LLM calls in execution order and the final relational query.
Each :class:`LLMCall` knows the query that produces its distinct inputs (relational, run by
the engine) and the name of the lookup relation its answers are written to; the final query
reads answers from those lookups, so the engine never calls a model itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sqlglot import exp

    from llmsql.udfs.base import CallKind, CallOptions, Volatility
    from llmsql.udfs.prompts import PromptTemplate

ARG_PREFIX = "__llmsql_a"
GROUP_PREFIX = "__llmsql_g"
RESULT_COL = "__llmsql_result"
COUNT_COL = "__llmsql_n"


@dataclass(frozen=True, slots=True)
class Field:
    """One prompt field: its name in the prompt and the SQL expression giving its value."""

    name: str
    expr: exp.Expression


@dataclass(frozen=True, slots=True)
class LLMCall:
    """One LLM function call, planned.

    ``input`` returns one row per distinct input (columns ``__llmsql_a<i>`` for the fields,
    ``__llmsql_g<i>`` for LLM_AGG's group keys, where all rows are kept); ``lookup`` is the
    relation the executor fills with the inputs plus ``__llmsql_result``.
    """

    id: str
    kind: CallKind
    template: PromptTemplate
    fields: tuple[Field, ...]
    options: CallOptions
    input: exp.Expression
    lookup: str
    text: str
    clause: str
    group_keys: tuple[exp.Expression, ...] = ()
    line: int | None = None
    col: int | None = None
    conjunct: tuple[int, int] | None = None
    """(scope number, WHERE conjunct index) when the call is a whole WHERE conjunct."""
    stop_after: int | None = None
    """LLM_FILTER under a LIMIT without ORDER BY: stop once this many rows passed."""

    @property
    def volatility(self) -> Volatility:
        """IMMUTABLE unless sampling without a fixed seed."""
        return self.options.volatility

    @property
    def where(self) -> str:
        """``LLM_FILTER(...) at line 2, column 7`` for messages."""
        pos = f" at line {self.line}, column {self.col}" if self.line is not None else ""
        return f"{self.kind.value}(...){pos}"


@dataclass(frozen=True, slots=True)
class QueryPlan:
    """LLM calls in execution order plus the final relational statement."""

    sql: str
    calls: tuple[LLMCall, ...]
    final: exp.Expression

    def explain(self, dialect: str = "duckdb") -> str:
        """An indented text rendering of the plan (stable: golden tests compare it)."""
        lines = ["QueryPlan"]
        for c in self.calls:
            fields = ", ".join(f.name for f in c.fields)
            lines.append(f"  LLMCall {c.id}: {c.kind.value} in {c.clause} [{fields}]")
            lines.append(f"    instruction: {c.template.instruction!r}")
            lines.append(f"    input: {c.input.sql(dialect=dialect)}")
        lines.append(f"  Final: {self.final.sql(dialect=dialect)}")
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class PromptBatch:
    """One LLM call bound to its input rows: what the optimizer rules rewrite.

    ``values[j][i]`` is field ``j`` of input row ``i``, already rendered to text. The rules
    fill in the physical choices; the answers a row gets never depend on them.
    """

    call: LLMCall
    values: tuple[tuple[str, ...], ...]
    n_rows: int
    rep: tuple[int, ...] | None = None
    """Dedup: row ``i`` is answered by row ``rep[i]`` (None: every row is its own)."""
    order: tuple[int, ...] | None = None
    """Send order: row indexes of the rows to send (representatives only)."""
    field_orders: tuple[tuple[int, ...], ...] = ()
    """The distinct field orders in use (indexes into the template's fields)."""
    row_field_order: tuple[int, ...] | None = None
    """Per input row, an index into ``field_orders`` (None: the written order)."""
    batches: tuple[int, ...] = ()
    """Batch boundaries as positions in ``order`` (each batch ends before the next bound)."""
    warmups: tuple[tuple[int, int], ...] = ()
    """(row, characters): before the batch holding ``row`` is sent, its prompt's first
    ``characters`` are sent alone (one output token, answer discarded) to warm the cache."""
    notes: tuple[str, ...] = ()
    """What each rule changed, for EXPLAIN."""
    rendered: tuple[str, ...] | None = None
    """Every row's prompt under the chosen field orders, once a rule rendered them (a
    rule that changes field orders must leave this None)."""

    def with_rendered(self) -> PromptBatch:
        """This batch with every row's prompt rendered once (rules after reordering use it)."""
        if self.rendered is not None:
            return self
        return dataclasses.replace(self, rendered=tuple(self.prompts(range(self.n_rows))))

    def prompts(self, rows: Sequence[int], /) -> list[str]:
        """The prompts of ``rows`` (each as :meth:`prompt` gives it), rendered in bulk: one
        :meth:`PromptTemplate.render_rows` per field order.
        """
        if self.rendered is not None:
            return [self.rendered[i] for i in rows]
        template = self.call.template
        if self.row_field_order is None:
            return template.render_rows(self.values, rows)
        by_order: dict[int, list[int]] = {}
        for pos, row in enumerate(rows):
            by_order.setdefault(self.row_field_order[row], []).append(pos)
        out = [""] * len(rows)
        for k, positions in by_order.items():
            texts = template.render_rows(self.values, [rows[p] for p in positions],
                                         self.field_orders[k])
            for pos, text in zip(positions, texts, strict=True):
                out[pos] = text
        return out

    def send_order(self) -> tuple[int, ...]:
        """Rows to send, in order (all representatives when no rule chose an order)."""
        if self.order is not None:
            return self.order
        if self.rep is None:
            return tuple(range(self.n_rows))
        return tuple(i for i in range(self.n_rows) if self.rep[i] == i)

    def field_order_of(self, row: int) -> tuple[int, ...] | None:
        """The field order chosen for ``row`` (None: the template's written order)."""
        if self.row_field_order is None:
            return None
        return self.field_orders[self.row_field_order[row]]

    def prompt(self, row: int) -> str:
        """The rendered prompt of ``row`` under the chosen field order."""
        if self.rendered is not None:
            return self.rendered[row]
        return self._render(row)

    def _render(self, row: int) -> str:
        vals = [col[row] for col in self.values]
        return self.call.template.render(vals, self.field_order_of(row))
