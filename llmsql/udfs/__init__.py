"""The LLM functions: one module per function, each exporting its :class:`UDFSpec` as ``SPEC``.

The registry is built from the modules of this package: a module that defines ``SPEC`` is a
function. Adding one takes its module here plus one line in :mod:`llmsql.dialect` (the SQL
node); planner, step, EXPLAIN and engines ask the spec (``call.kind.spec``).

>>> SPECS["LLM_SCORE"].sql_type, CallKind.SCORE.value, CallKind.SCORE.spec is SPECS["LLM_SCORE"]
('DOUBLE', 'LLM_SCORE', True)
>>> REGISTRY[CallKind.FILTER].predicate, CallKind.AGG.spec.aggregate
(True, True)
"""

from __future__ import annotations

from llmsql.udfs.base import CallOptions, Parsed, SchemaField, UDFSpec, Volatility, registry
from llmsql.udfs.prompts import PromptTemplate, render_value

CallKind = registry().kinds
"""The LLM functions, one member per spec (``CallKind.FILTER.value == 'LLM_FILTER'``;
``CallKind.FILTER.spec`` is its spec)."""
SPECS: dict[str, UDFSpec] = registry().specs
"""Spec by SQL name."""
REGISTRY = registry().by_kind
"""Spec by :data:`CallKind`."""

__all__ = [
    "REGISTRY",
    "SPECS",
    "CallKind",
    "CallOptions",
    "Parsed",
    "PromptTemplate",
    "SchemaField",
    "UDFSpec",
    "Volatility",
    "render_value",
]
