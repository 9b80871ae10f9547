"""LLM_AGG(instruction, field, ...) -> VARCHAR per group.

A group's rows are rendered as ``name: value`` blocks after the instruction. When a group's
text exceeds the model's context, it is summarised map-reduce style: chunks that fit are
answered separately, then the partial answers are combined with the same instruction
(:func:`reduce_prompt`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmsql.udfs.base import CallOptions, Parsed, UDFSpec

if TYPE_CHECKING:
    from collections.abc import Sequence

DEFAULT_MAX_TOKENS = 128
PARTIAL_HEADER = "Partial answers, each over a part of the rows:"


def parse(text: str, options: CallOptions, /) -> Parsed:
    """Free text, stripped."""
    return Parsed(text.strip(), True)


def reduce_prompt(instruction: str, partials: Sequence[str], /) -> str:
    """The prompt combining partial answers (empty ones left out).

    >>> reduce_prompt("Summarize.", ["a", "", "b"])
    'Summarize.\\nPartial answers, each over a part of the rows:\\n- a\\n- b\\n'
    """
    body = "".join(f"- {p}\n" for p in partials if p)
    return f"{instruction}\n{PARTIAL_HEADER}\n{body}"


SPEC = UDFSpec("LLM_AGG", "AGG", "VARCHAR", DEFAULT_MAX_TOKENS, parse, aggregate=True,
               reduce_prompt=reduce_prompt)
