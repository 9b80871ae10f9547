"""Tiny builders for the rules' doctests (not part of the public API)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlglot import exp

from llmsql.plan import Field, LLMCall, PromptBatch
from llmsql.udfs import CallKind
from llmsql.udfs.base import CallOptions
from llmsql.udfs.prompts import PromptTemplate

if TYPE_CHECKING:
    from collections.abc import Sequence


def batch_of(columns: Sequence[Sequence[str]], instruction: str = "Q") -> PromptBatch:
    """A PromptBatch of a MAP call over ``columns`` (fields f0, f1, ...)."""
    names = [f"f{j}" for j in range(len(columns))]
    call = LLMCall(
        id="doc", kind=CallKind.MAP, template=PromptTemplate.parse(instruction, names),
        fields=tuple(Field(n, exp.column(n)) for n in names), options=CallOptions(),
        input=exp.select("1"), lookup="doc", text="LLM(...)", clause="SELECT",
    )
    n = len(columns[0]) if columns else 0
    return PromptBatch(call=call, values=tuple(tuple(c) for c in columns), n_rows=n)
