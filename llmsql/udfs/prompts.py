"""Prompt templates and the default rendering contract.

Default rendering (``../shared/bench/WORKLOADS.md``)::

    instruction + "\\n" + "".join(f"{name}: {value}\\n" for each field, in the chosen order)

An instruction with ``{column}`` placeholders renders exactly as written, with the values
substituted in one pass (a value containing braces is never re-expanded); fields it does
not reference are appended as ``name: value`` lines. ``{{`` and ``}}`` are literal braces.

>>> t = PromptTemplate.parse("Is it good?", ("title", "review"))
>>> t.render(("Up", "Great fun"))
'Is it good?\\ntitle: Up\\nreview: Great fun\\n'
>>> t = PromptTemplate.parse("Rate {title}.", ("title", "review"))
>>> t.render(("Up", "Great {fun}"))
'Rate Up.\\nreview: Great {fun}\\n'
"""

from __future__ import annotations

import datetime as _dt
import decimal
import json
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


def render_value(value: Any) -> str:  # noqa: PLR0911 - one return per SQL type
    """Format one value exactly as the rendering contract says (engine-independent).

    >>> [render_value(v) for v in (None, "a\\nb", 3, 0.1, True, _dt.date(2024, 1, 2))]
    ['', 'a\\nb', '3', '0.1', 'true', '2024-01-02']
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    if isinstance(value, (_dt.date, _dt.datetime, _dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return json.dumps(value, default=str, ensure_ascii=False)


def placeholders(instruction: str) -> tuple[str, ...]:
    """Names referenced as ``{name}`` in ``instruction``, in first-use order."""
    seen: dict[str, None] = {}
    for m in _PLACEHOLDER.finditer(instruction):
        if m.group(1):
            seen.setdefault(m.group(1), None)
    return tuple(seen)


@dataclass(frozen=True, slots=True)
class PromptTemplate:
    """An instruction plus the names of the fields rendered after it.

    ``fields`` are all field names in written order (placeholders included);
    ``placeholders`` are the ones the instruction references, which render inline.
    """

    instruction: str
    fields: tuple[str, ...]
    placeholders: tuple[str, ...] = ()

    @staticmethod
    def parse(instruction: str, fields: Sequence[str]) -> PromptTemplate:
        """Build a template; placeholder names not among ``fields`` are appended."""
        refs = placeholders(instruction)
        names = tuple(fields) + tuple(r for r in refs if r not in fields)
        return PromptTemplate(instruction, names, refs)

    @property
    def order_is_fixed(self) -> bool:
        """True when the instruction has placeholders (its text order is the user's)."""
        return bool(self.placeholders)

    @property
    def appended(self) -> tuple[int, ...]:
        """Indexes of fields rendered as ``name: value`` lines (not placeholders)."""
        return tuple(i for i, f in enumerate(self.fields) if f not in self.placeholders)

    def head(self, values: Sequence[str]) -> str:
        """The instruction line(s) with placeholders substituted."""
        if not self.placeholders:
            return self.instruction + "\n"
        by_name = dict(zip(self.fields, values, strict=True))

        def sub(m: re.Match[str]) -> str:
            tok = m.group(0)
            if tok == "{{":
                return "{"
            if tok == "}}":
                return "}"
            return by_name[m.group(1)]

        return _PLACEHOLDER.sub(sub, self.instruction) + "\n"

    def render(self, values: Sequence[str], order: Sequence[int] | None = None) -> str:
        """Render one row; ``order`` permutes the appended fields (indexes into fields)."""
        idx = self.appended if order is None else order
        body = "".join(f"{self.fields[i]}: {values[i]}\n" for i in idx)
        return self.head(values) + body

    def render_rows(
        self, columns: Sequence[Sequence[str]], rows: Sequence[int],
        order: Sequence[int] | None = None,
    ) -> list[str]:
        """Render many rows with one field order: the same text as :meth:`render` row by
        row, built by one ``%``-format per row (EXPLAIN renders every row of a call twice).

        Args:
            columns: ``columns[j][i]``: field ``j`` of row ``i``, rendered.
            rows: the rows to render, in the order wanted.
            order: as for :meth:`render`.

        >>> t = PromptTemplate.parse("100% sure?", ("a", "b"))
        >>> t.render_rows([["x", "y"], ["1", "2"]], [1, 0], (1, 0))
        ['100% sure?\\nb: 2\\na: y\\n', '100% sure?\\nb: 1\\na: x\\n']
        """
        if self.placeholders:  # the head depends on the row
            return [self.render([col[r] for col in columns], order) for r in rows]
        idx = self.appended if order is None else order
        head = self.instruction + "\n"
        if not idx:
            return [head] * len(rows)
        fmt = head.replace("%", "%%") + "".join(
            f"{self.fields[i].replace('%', '%%')}: %s\n" for i in idx)
        picked = [[columns[i][r] for r in rows] for i in idx]
        return [fmt % values for values in zip(*picked, strict=True)]
