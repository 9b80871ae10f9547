"""The LLM functions: name -> UDFSpec (output parser, default tokens, result type)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llmsql.udfs import llm_agg, llm_classify, llm_extract, llm_filter, llm_map
from llmsql.udfs.base import CallKind, CallOptions, Parsed, SchemaField, Volatility
from llmsql.udfs.prompts import PromptTemplate, render_value


@dataclass(frozen=True, slots=True)
class UDFSpec:
    """What the engine needs to know about one LLM function."""

    kind: CallKind
    parse: Callable[[str, CallOptions], Parsed]
    default_max_tokens: int
    sql_type: str


REGISTRY: dict[CallKind, UDFSpec] = {
    CallKind.MAP: UDFSpec(CallKind.MAP, llm_map.parse, llm_map.DEFAULT_MAX_TOKENS, "VARCHAR"),
    CallKind.FILTER: UDFSpec(
        CallKind.FILTER, llm_filter.parse, llm_filter.DEFAULT_MAX_TOKENS, "BOOLEAN"
    ),
    CallKind.CLASSIFY: UDFSpec(
        CallKind.CLASSIFY, llm_classify.parse, llm_classify.DEFAULT_MAX_TOKENS, "VARCHAR"
    ),
    CallKind.EXTRACT: UDFSpec(
        CallKind.EXTRACT, llm_extract.parse, llm_extract.DEFAULT_MAX_TOKENS, "STRUCT"
    ),
    CallKind.AGG: UDFSpec(CallKind.AGG, llm_agg.parse, llm_agg.DEFAULT_MAX_TOKENS, "VARCHAR"),
}

__all__ = [
    "REGISTRY",
    "CallKind",
    "CallOptions",
    "Parsed",
    "PromptTemplate",
    "SchemaField",
    "UDFSpec",
    "Volatility",
    "render_value",
]
