"""The llmsql SQL dialect: DuckDB's SQL plus typed LLM function nodes.

LLM functions parse into subclasses of :class:`LLMFunc` instead of ``exp.Anonymous``, so
the planner finds them by type. Names are case-insensitive.

>>> import sqlglot
>>> tree = sqlglot.parse_one("SELECT LLM_FILTER('ok?', review) FROM t", read=LLMSQL)
>>> type(tree.selects[0]).__name__
'LLMFilter'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from sqlglot import exp
from sqlglot.dialects.duckdb import DuckDB

from llmsql.udfs import SPECS, CallKind, UDFSpec

if TYPE_CHECKING:
    from collections.abc import Callable


class LLMFunc(exp.Expression, exp.Func):  # sqlglot>=30 needs Expression first
    """Base node for LLM functions: first arg is the instruction, the rest are fields/options.

    A subclass names its function's spec (``spec = SPECS["LLM_SCORE"]``), which gives its SQL
    name; every such subclass is parsed (:data:`LLM_FUNCS`).
    """

    arg_types: ClassVar[dict[str, bool]] = {"expressions": True}  # type: ignore[misc]
    is_var_len_args = True
    spec: ClassVar[UDFSpec]

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "spec" in cls.__dict__:
            cls._sql_names = [cls.spec.name]
            _FUNCS.append(cls)

    @property
    def kind(self) -> CallKind:
        """The function this node calls."""
        return self.spec.call_kind


_FUNCS: list[type[LLMFunc]] = []

# One node class per LLM function (its spec, and a name for the Python API); an aggregate
# also derives from exp.AggFunc, so that sqlglot treats it as one. A function whose module
# defines a SPEC but has no node here does not parse (tests/udfs/test_registry.py).


class LLMMap(LLMFunc):
    """``LLM(instruction, field, ...)`` -> VARCHAR."""

    spec = SPECS["LLM"]


class LLMFilter(LLMFunc):
    """``LLM_FILTER(instruction, field, ...)`` -> BOOLEAN."""

    spec = SPECS["LLM_FILTER"]


class LLMClassify(LLMFunc):
    """``LLM_CLASSIFY(instruction, labels => [...], field, ...)`` -> VARCHAR (one label)."""

    spec = SPECS["LLM_CLASSIFY"]


class LLMExtract(LLMFunc):
    """``LLM_EXTRACT(instruction, schema => 'name TYPE, ...', field, ...)`` -> STRUCT."""

    spec = SPECS["LLM_EXTRACT"]


class LLMAgg(LLMFunc, exp.AggFunc):  # type: ignore[misc]
    """``LLM_AGG(instruction, field, ...)`` -> VARCHAR per group (an aggregate)."""

    spec = SPECS["LLM_AGG"]


class LLMScore(LLMFunc):
    """``LLM_SCORE(instruction, field, ...)`` -> DOUBLE in [0, 1] (P(Yes))."""

    spec = SPECS["LLM_SCORE"]


LLM_FUNCS: tuple[type[LLMFunc], ...] = tuple(_FUNCS)
NODES: dict[str, type[LLMFunc]] = {f.spec.name: f for f in LLM_FUNCS}
"""The node class of each LLM function, by SQL name."""


def _builder(cls: type[LLMFunc]) -> Callable[[list[exp.Expression]], LLMFunc]:
    def build(args: list[exp.Expression]) -> LLMFunc:
        return cls(expressions=args)

    return build


class LLMSQL(DuckDB):
    """DuckDB SQL plus typed LLM function nodes."""

    class Parser(DuckDB.Parser):
        """DuckDB's parser, reading each LLM function as its typed node."""

        FUNCTIONS = {  # noqa: RUF012
            **DuckDB.Parser.FUNCTIONS,
            **{name: _builder(f) for f in LLM_FUNCS for name in f.sql_names()},
        }

    class Generator(DuckDB.Generator):
        """DuckDB's generator, writing each LLM node back as its SQL call."""

        def llmfunc_sql(self, expression: LLMFunc) -> str:
            """``LLM_FILTER('...', a, b)`` for an LLM node."""
            return self.func(expression.sql_name(), *expression.expressions)

        TRANSFORMS = {  # noqa: RUF012
            **DuckDB.Generator.TRANSFORMS,
            **{f: (lambda self, e: self.func(e.sql_name(), *e.expressions)) for f in LLM_FUNCS},
        }
