"""LLM_AGG(instruction, field, ...) -> VARCHAR per group.

A group's rows are rendered as ``name: value`` blocks after the instruction. When a group's
text exceeds the model's context, it is summarised map-reduce style: chunks that fit are
answered separately, then the partial answers are combined with the same instruction.
"""

from __future__ import annotations

from llmsql.udfs.base import CallOptions, Parsed

DEFAULT_MAX_TOKENS = 128
PARTIAL_HEADER = "Partial answers, each over a part of the rows:"


def parse(text: str, options: CallOptions, /) -> Parsed:
    """Free text, stripped."""
    return Parsed(text.strip(), True)
