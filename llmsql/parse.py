"""SQL text -> sqlglot tree in the llmsql dialect; sqlglot errors become ParseError."""

from __future__ import annotations

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError as SqlglotParseError
from sqlglot.errors import TokenError

from llmsql.dialect import LLMSQL
from llmsql.errors import ParseError

LLM_NAMES = ("LLM", "LLM_FILTER", "LLM_CLASSIFY", "LLM_EXTRACT", "LLM_AGG")


def parse(sql: str, /) -> list[exp.Expression]:
    """Parse one or more ``;``-separated statements.

    Raises:
        ParseError: the text is not valid SQL, with the line and column of the problem.
    """
    if not sql.strip():
        msg = "the query is empty; write a SELECT statement"
        raise ParseError(msg, sql=sql)
    try:
        trees = sqlglot.parse(sql, read=LLMSQL)
    except SqlglotParseError as exc:
        first = exc.errors[0] if exc.errors else {}
        desc = first.get("description", str(exc))
        near = first.get("highlight") or ""
        hint = f" near {near!r}" if near else ""
        msg = f"SQL syntax error: {desc}{hint}; check the statement's syntax"
        raise ParseError(
            msg,
            sql=sql,
            line=first.get("line"),
            col=first.get("col"),
        ) from None
    except TokenError as exc:
        msg = f"SQL syntax error: {exc} (an unterminated string or comment?)"
        raise ParseError(
            msg, sql=sql
        ) from None
    statements = [t for t in trees if t is not None]
    if not statements:
        msg = "the query has no statement; write a SELECT statement"
        raise ParseError(msg, sql=sql)
    for tree in statements:
        _reject_misspelled_llm_functions(tree, sql)
    return statements


def _reject_misspelled_llm_functions(tree: exp.Expression, sql: str) -> None:
    """An unknown function that looks like an LLM function is almost surely a typo."""
    for node in tree.find_all(exp.Anonymous):
        name = str(node.this).upper()
        if name.startswith("LLM"):
            meta = node.meta or {}
            msg = f"unknown function {node.this}(); the LLM functions are {', '.join(LLM_NAMES)}"
            raise ParseError(
                msg,
                sql=sql,
                line=meta.get("line"),
                col=meta.get("col"),
            )
