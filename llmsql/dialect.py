"""The llmsql SQL dialect: DuckDB's SQL plus typed LLM function nodes.

LLM functions parse into subclasses of :class:`LLMFunc` instead of ``exp.Anonymous``, so
the planner finds them by type. Names are case-insensitive.

>>> import sqlglot
>>> tree = sqlglot.parse_one("SELECT LLM_FILTER('ok?', review) FROM t", read=LLMSQL)
>>> type(tree.selects[0]).__name__
'LLMFilter'
"""

from __future__ import annotations

from typing import ClassVar

from sqlglot import exp
from sqlglot.dialects.duckdb import DuckDB


class LLMFunc(exp.Expression, exp.Func):  # sqlglot>=30 needs Expression first
    """Base node for LLM functions: first arg is the instruction, the rest are fields/options."""

    arg_types: ClassVar[dict[str, bool]] = {"expressions": True}  # type: ignore[misc]
    is_var_len_args = True
    kind: ClassVar[str] = ""


class LLMMap(LLMFunc):
    """``LLM(instruction, field, ...)`` -> VARCHAR."""

    _sql_names: ClassVar[list[str]] = ["LLM"]
    kind = "map"


class LLMFilter(LLMFunc):
    """``LLM_FILTER(instruction, field, ...)`` -> BOOLEAN."""

    _sql_names: ClassVar[list[str]] = ["LLM_FILTER"]
    kind = "filter"


class LLMClassify(LLMFunc):
    """``LLM_CLASSIFY(instruction, labels => [...], field, ...)`` -> VARCHAR (one label)."""

    _sql_names: ClassVar[list[str]] = ["LLM_CLASSIFY"]
    kind = "classify"


class LLMExtract(LLMFunc):
    """``LLM_EXTRACT(instruction, schema => 'name TYPE, ...', field, ...)`` -> STRUCT."""

    _sql_names: ClassVar[list[str]] = ["LLM_EXTRACT"]
    kind = "extract"


class LLMAgg(LLMFunc, exp.AggFunc):  # type: ignore[misc]
    """``LLM_AGG(instruction, field, ...)`` -> VARCHAR per group (an aggregate)."""

    _sql_names: ClassVar[list[str]] = ["LLM_AGG"]
    kind = "agg"


LLM_FUNCS: tuple[type[LLMFunc], ...] = (LLMMap, LLMFilter, LLMClassify, LLMExtract, LLMAgg)


def _builder(cls: type[LLMFunc]):  # type: ignore[no-untyped-def]
    def build(args: list[exp.Expression]) -> LLMFunc:
        return cls(expressions=args)

    return build


class LLMSQL(DuckDB):
    """DuckDB SQL plus typed LLM function nodes."""

    class Parser(DuckDB.Parser):
        FUNCTIONS = {  # noqa: RUF012
            **DuckDB.Parser.FUNCTIONS,
            **{name: _builder(f) for f in LLM_FUNCS for name in f.sql_names()},
        }

    class Generator(DuckDB.Generator):
        def llmfunc_sql(self, expression: LLMFunc) -> str:
            return self.func(expression.sql_name(), *expression.expressions)

        TRANSFORMS = {  # noqa: RUF012
            **DuckDB.Generator.TRANSFORMS,
            **{f: (lambda self, e: self.func(e.sql_name(), *e.expressions)) for f in LLM_FUNCS},
        }
