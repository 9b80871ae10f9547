"""LLM(instruction, field, ...) -> VARCHAR: free text, stripped."""

from __future__ import annotations

from llmsql.udfs.base import CallOptions, Parsed, UDFSpec

DEFAULT_MAX_TOKENS = 64


def parse(text: str, options: CallOptions, /) -> Parsed:
    """Free text: the answer stripped of surrounding whitespace."""
    return Parsed(text.strip(), True)


SPEC = UDFSpec("LLM", "MAP", "VARCHAR", DEFAULT_MAX_TOKENS, parse)
