"""The adapter statements: ``CREATE ADAPTER``, ``SHOW ADAPTERS``, ``DROP ADAPTER`` -> typed values.

::

    CREATE ADAPTER name FOR LLM_FILTER('instruction', col, ...)
        [USING LORA (rank => 16, alpha => 32, target_modules => 'q_proj,v_proj', ...)]
        [ASYNC] AS SELECT col, ..., label FROM t WHERE ...
    SHOW ADAPTERS
    DROP ADAPTER [IF EXISTS] name

The ``FOR`` call is planned by the planner exactly as the same call in a query would be
(:func:`llmsql.planner.plan_query`), so its instruction, prompt fields and options are those
the call will use at inference. The ``AS`` part stays SQL text, checked by sqlglot; its
output columns must be the call's fields plus one label column.

>>> s = parse_adapter_statement(
...     "CREATE ADAPTER fresh FOR LLM_FILTER('Is it fresh?', review) "
...     "USING LORA (rank => 8) AS SELECT review, label FROM t")
>>> s.name, s.call.kind, s.call.columns, s.lora.rank, s.label
('fresh', 'LLM_FILTER', ('review',), 8, 'label')
>>> parse_adapter_statement("DROP ADAPTER IF EXISTS fresh")
DropAdapter(name='fresh', if_exists=True)
>>> parse_adapter_statement("SELECT 1") is None
True
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlglot import exp
from sqlglot.errors import TokenError
from sqlglot.tokens import TokenType

from llmsql.adapters.options import LoraOptions, lora_options
from llmsql.dialect import LLMSQL, LLMFunc
from llmsql.errors import ParseError, PlanError
from llmsql.parse import parse
from llmsql.planner import option_value, plan_query

if TYPE_CHECKING:
    from sqlglot.tokens import Token

    from llmsql.udfs.base import CallOptions

ADAPTER_FUNCTIONS = ("LLM_FILTER", "LLM_CLASSIFY", "LLM", "LLM_EXTRACT")
"""The LLM functions an adapter can be trained for."""
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
"""An adapter name (also its file name): a letter or ``_``, then letters, digits, ``_``."""
SYNTAX = ("CREATE ADAPTER name FOR LLM_FILTER('instruction', col, ...) "
          "[USING LORA (rank => 16, ...)] [ASYNC] AS SELECT col, ..., label FROM t")
_ROWS = "__llmsql_adapter_rows"


@dataclass(frozen=True, slots=True)
class AdapterCall:
    """The call an adapter is trained for, as the planner reads it."""

    kind: str
    """The function's SQL name, e.g. ``LLM_FILTER``."""
    instruction: str
    columns: tuple[str, ...]
    """The prompt fields, in rendering order (with ``{placeholder}`` fields)."""
    options: CallOptions
    text: str
    """The call as SQL (``LLM_FILTER('...', review)``)."""


@dataclass(frozen=True, slots=True)
class CreateAdapter:
    """``CREATE ADAPTER``: train ``name`` for ``call`` on the rows of ``source``."""

    name: str
    call: AdapterCall
    lora: LoraOptions
    source: str
    """The ``AS SELECT ...`` text: the call's columns plus the label column."""
    label: str
    """The label column: the answer the call should give for each row."""
    asynchronous: bool = False


@dataclass(frozen=True, slots=True)
class ShowAdapters:
    """``SHOW ADAPTERS``."""


@dataclass(frozen=True, slots=True)
class DropAdapter:
    """``DROP ADAPTER [IF EXISTS] name``."""

    name: str
    if_exists: bool = False


AdapterStatement = CreateAdapter | ShowAdapters | DropAdapter


def parse_adapter_statement(sql: str, /) -> AdapterStatement | None:
    """The adapter statement ``sql`` is, or None when it is not one (a query, SET...).

    Raises:
        ParseError: it starts like an adapter statement but is malformed.
        PlanError: the ``FOR`` call, the ``USING LORA`` options or the ``AS SELECT``
            columns are wrong.
    """
    tokens = _tokens(sql)
    words = [t.text.upper() for t in tokens[:3]]
    if words[:2] == ["SHOW", "ADAPTERS"]:
        _expect_end(sql, tokens, 2, "SHOW ADAPTERS")
        return ShowAdapters()
    if words[:2] == ["DROP", "ADAPTER"]:
        return _drop(sql, tokens)
    if words[:2] == ["CREATE", "ADAPTER"]:
        return _create(sql, tokens)
    return None


def is_adapter_statement(sql: str, /) -> bool:
    """True when ``sql`` starts like an adapter statement (cheap, never raises)."""
    head = sql.lstrip().split(None, 2)[:2]
    return [w.upper().rstrip(";") for w in head] in (
        ["SHOW", "ADAPTERS"], ["DROP", "ADAPTER"], ["CREATE", "ADAPTER"])


# ---- tokens ---------------------------------------------------------------------------------


def _tokens(sql: str) -> list[Token]:
    try:
        tokens = LLMSQL().tokenize(sql)
    except TokenError as exc:
        msg = f"SQL syntax error: {exc} (an unterminated string or comment?)"
        raise ParseError(msg, sql=sql) from None
    while tokens and tokens[-1].token_type == TokenType.SEMICOLON:
        tokens.pop()
    return tokens


def _fail(sql: str, tokens: list[Token], i: int, expected: str, syntax: str) -> ParseError:
    if i < len(tokens):
        got, line, col = repr(tokens[i].text), tokens[i].line, tokens[i].col
    else:
        got, line, col = "the end of the statement", None, None
    msg = f"expected {expected}, got {got}; the syntax is {syntax}"
    return ParseError(msg, sql=sql, line=line, col=col)


def _expect_end(sql: str, tokens: list[Token], i: int, syntax: str) -> None:
    if i < len(tokens):
        raise _fail(sql, tokens, i, "the end of the statement", syntax)


def _name(sql: str, tokens: list[Token], i: int, syntax: str) -> str:
    """An adapter name: unquoted names are case-insensitive (kept lower case)."""
    if i >= len(tokens) or tokens[i].token_type not in (TokenType.VAR, TokenType.IDENTIFIER):
        raise _fail(sql, tokens, i, "an adapter name", syntax)
    tok = tokens[i]
    name = tok.text if tok.token_type == TokenType.IDENTIFIER else tok.text.lower()
    if not NAME.match(name):
        msg = (f"adapter name {name!r} is not allowed; use a letter or _ followed by up to 63 "
               "letters, digits or _")
        raise ParseError(msg, sql=sql, line=tok.line, col=tok.col)
    return name


def _closing(sql: str, tokens: list[Token], i: int, syntax: str) -> int:
    """The index of the ``)`` matching the ``(`` at ``i``."""
    if i >= len(tokens) or tokens[i].token_type != TokenType.L_PAREN:
        raise _fail(sql, tokens, i, "'('", syntax)
    depth = 0
    for j in range(i, len(tokens)):
        depth += {TokenType.L_PAREN: 1, TokenType.R_PAREN: -1}.get(tokens[j].token_type, 0)
        if depth == 0:
            return j
    raise _fail(sql, tokens, len(tokens), "')'", syntax)


def _is(tokens: list[Token], i: int, word: str) -> bool:
    return i < len(tokens) and tokens[i].text.upper() == word


# ---- statements -----------------------------------------------------------------------------


def _drop(sql: str, tokens: list[Token]) -> DropAdapter:
    syntax = "DROP ADAPTER [IF EXISTS] name"
    if_exists = _is(tokens, 2, "IF")
    if if_exists and not _is(tokens, 3, "EXISTS"):
        raise _fail(sql, tokens, 3, "EXISTS", syntax)
    at = 4 if if_exists else 2
    name = _name(sql, tokens, at, syntax)
    _expect_end(sql, tokens, at + 1, syntax)
    return DropAdapter(name, if_exists)


def _create(sql: str, tokens: list[Token]) -> CreateAdapter:
    name = _name(sql, tokens, 2, SYNTAX)
    if not _is(tokens, 3, "FOR"):
        raise _fail(sql, tokens, 3, "FOR", SYNTAX)
    end = _closing(sql, tokens, 5, SYNTAX)
    call = adapter_call(sql[tokens[4].start:tokens[end].end + 1])
    i, lora = _using(sql, tokens, end + 1)
    asynchronous = _is(tokens, i, "ASYNC")
    i += asynchronous
    if not _is(tokens, i, "AS") or i + 1 >= len(tokens):
        raise _fail(sql, tokens, i, "AS SELECT ...", SYNTAX)
    source = sql[tokens[i + 1].start:tokens[-1].end + 1].strip()
    label = label_column(source, call)
    return CreateAdapter(name, call, lora, source, label, asynchronous)


def _using(sql: str, tokens: list[Token], i: int) -> tuple[int, LoraOptions]:
    """``USING LORA (...)`` at ``i``, if there: the index after it and the options."""
    if not _is(tokens, i, "USING"):
        return i, lora_options({})
    if not _is(tokens, i + 1, "LORA"):
        raise _fail(sql, tokens, i + 1, "LORA (the only adapter method)", SYNTAX)
    end = _closing(sql, tokens, i + 2, SYNTAX)
    inner = sql[tokens[i + 2].end + 1:tokens[end].start]
    return end + 1, lora_options(_option_values(sql, inner))


def _option_values(sql: str, inner: str) -> dict[str, object]:
    if not inner.strip():
        return {}
    tree = parse(f"SELECT __lora({inner})")[0]
    func = tree.selects[0] if isinstance(tree, exp.Select) else tree
    out: dict[str, object] = {}
    for arg in func.expressions:
        if not isinstance(arg, (exp.Kwarg, exp.PropertyEQ)):
            msg = (f"USING LORA takes name => value options, got {arg.sql(dialect=LLMSQL)!r}; "
                   "write e.g. USING LORA (rank => 16, lr => 2e-4)")
            raise ParseError(msg, sql=sql)
        key = arg.this.name.lower()
        if key in out:
            msg = f"USING LORA option {key!r} is given twice; give it once"
            raise PlanError(msg, sql=sql)
        out[key] = option_value(arg.expression, key, "USING LORA", sql, None, None)
    return out


# ---- the FOR call and the AS SELECT ---------------------------------------------------------


def adapter_call(text: str, /) -> AdapterCall:
    """Plan the call ``text`` (``LLM_FILTER('...', col)``) as a query would plan it.

    Raises:
        ParseError: it is not an LLM function call.
        PlanError: it is a function adapters are not trained for, or is malformed (the
            planner's own checks), or a field is not a plain column.
    """
    query = f"SELECT {text} FROM {_ROWS}"
    trees = parse(query)
    tree = trees[0]
    node = tree.selects[0] if isinstance(tree, exp.Select) else tree
    name = node.sql_name() if isinstance(node, LLMFunc) else node.sql(dialect=LLMSQL)[:40]
    if len(trees) != 1 or name not in ADAPTER_FUNCTIONS:
        msg = (f"CREATE ADAPTER ... FOR {name}: an adapter is trained for one call of "
               f"{', '.join(ADAPTER_FUNCTIONS)}; write e.g. FOR LLM_FILTER('Is it fresh?', review)")
        raise PlanError(msg, sql=text)
    call = plan_query(query, tree).calls[0]
    if call.options.adapter is not None:
        msg = (f"CREATE ADAPTER ... FOR {name}: the call names adapter "
               f"{call.options.adapter!r}; an adapter is trained on the base model, so "
               "remove adapter => from the FOR call")
        raise PlanError(msg, sql=text)
    for field in call.fields:
        if not isinstance(field.expr, exp.Column):
            msg = (f"CREATE ADAPTER ... FOR {name}: field {field.name!r} is an expression; "
                   "compute it in the AS SELECT with an alias and pass the alias")
            raise PlanError(msg, sql=text)
    return AdapterCall(name, call.template.instruction, tuple(f.name for f in call.fields),
                       call.options, node.sql(dialect=LLMSQL))


def label_column(source: str, call: AdapterCall, /) -> str:
    """The label column of ``source``: its one output column that is not a call field.

    Raises:
        ParseError: ``source`` is not one SELECT.
        PlanError: a call field is missing, the label is missing, or there are several.
    """
    trees = parse(source)
    if len(trees) != 1 or not isinstance(trees[0], exp.Query):
        msg = "CREATE ADAPTER ... AS needs one SELECT statement giving the training rows"
        raise ParseError(msg, sql=source)
    names = [s.output_name for s in trees[0].selects]
    if "*" in names or any(not n for n in names):
        msg = ("CREATE ADAPTER ... AS SELECT must name its columns (no *, expressions need an "
               f"alias): the call's fields {', '.join(call.columns)} and the label")
        raise PlanError(msg, sql=source)
    missing = [c for c in call.columns if c not in names]
    if missing:
        msg = (f"CREATE ADAPTER ... AS SELECT lacks the call's field(s) {', '.join(missing)}; "
               f"select {', '.join(call.columns)} plus the label column")
        raise PlanError(msg, sql=source)
    return _one_label([n for n in names if n not in call.columns], call, source)


def _one_label(extra: list[str], call: AdapterCall, source: str) -> str:
    if len(extra) == 1:
        return extra[0]
    fields = ", ".join(call.columns)
    if not extra:
        msg = (f"CREATE ADAPTER ... AS SELECT has no label column: it selects only the call's "
               f"fields; add the expected answer, e.g. SELECT {fields}, label FROM ...")
    else:
        msg = (f"CREATE ADAPTER ... AS SELECT has several columns besides the call's fields "
               f"({', '.join(extra)}); select only {fields} and one label column")
    raise PlanError(msg, sql=source)
