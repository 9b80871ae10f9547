"""sqlglot tree -> QueryPlan: every LLM call is lifted out into an explicit :class:`LLMCall`.

How a call is planned: its distinct inputs come from a relational *input query* derived
from the SELECT that contains it (same FROM, joins and non-LLM WHERE conjuncts, so cheap
predicates run first); the call itself is replaced in the query by a lookup into the
relation its answers are written to. The engine therefore only ever runs plain SQL, and an
LLM function is evaluated once per distinct input, never once per syntactic occurrence.

Calls are planned innermost scope first (CTEs before the body that reads them), and inside a
scope in this order: WHERE conjuncts (each one sees only rows that passed the previous
ones), GROUP BY, SELECT, HAVING, ORDER BY, then LLM_AGG. No generic sqlglot rewrite runs
over the tree: those duplicate or reorder LLM calls (see docs/STYLE.md).

This module is over the 500-line guideline: it is one recursive walk over sqlglot scopes
(CTEs, subqueries, WHERE/GROUP BY/SELECT/HAVING/ORDER BY, aggregates) whose cases share the
scope state; per-function behaviour is already in the UDF specs (:mod:`llmsql.udfs`).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlglot import exp

from llmsql.dialect import LLMSQL, LLMFunc
from llmsql.errors import PlanError, UnsupportedError
from llmsql.plan import ARG_PREFIX, GROUP_PREFIX, RESULT_COL, Field, LLMCall, QueryPlan
from llmsql.udfs import SPECS, CallKind
from llmsql.udfs.base import CallOptions
from llmsql.udfs.prompts import PromptTemplate

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

_CLAUSE_RANK = {"where": 0, "joins": 0, "group": 1, "expressions": 2, "having": 3, "order": 4}
_CLAUSE_NAMES = {
    "where": "WHERE",
    "joins": "JOIN",
    "group": "GROUP BY",
    "expressions": "SELECT",
    "having": "HAVING",
    "order": "ORDER BY",
}
COMMON_OPTIONS = ("model", "max_tokens", "temperature", "seed", "truncate", "adapter")
"""Options every LLM function takes; a function's own (``labels``...) are in its spec."""
OPTION_NAMES = (*COMMON_OPTIONS[:4],
                *dict.fromkeys(r.name for s in SPECS.values() for r in s.options),
                *COMMON_OPTIONS[4:])


def plan_query(
    sql: str,
    tree: exp.Expression,
    /,
    *,
    query_id: str = "q",
    predicate_order: Mapping[tuple[int, int], float] | None = None,
) -> QueryPlan:
    """Lift every LLM call of ``tree`` into an :class:`LLMCall`; ``tree`` is not modified.

    Args:
        sql: the query text (for messages).
        tree: the parsed statement.
        query_id: prefix of the call ids and lookup names.
        predicate_order: rank of WHERE conjuncts, keyed by (scope number, conjunct index);
            lower ranks are evaluated first (see ``order_llm_predicates``). Default: as
            written.

    Raises:
        PlanError: a call is malformed (options, labels, schema, instruction).
        UnsupportedError: a call sits where llmsql cannot plan it yet.
    """
    work = tree.copy()
    counter = itertools.count(1)
    calls: list[LLMCall] = []
    order = predicate_order or {}
    for scope_no, scope in enumerate(list(_selects_postorder(work))):
        _move_inner_join_llm_conditions(scope, sql)
        _alias_llm_projections(scope)
        calls.extend(_plan_scope(scope, scope_no, sql, query_id, counter, order))
    _reject_leftover_calls(work, sql)
    return QueryPlan(sql=sql, calls=tuple(calls), final=work)


def _selects_postorder(node: exp.Expression) -> Iterator[exp.Select]:
    """Selects, children before parents, a WITH's CTEs before the body that reads them."""
    keys = sorted(node.args, key=lambda k: 0 if k == "with_" else 1)
    for key in keys:
        value = node.args[key]
        for child in value if isinstance(value, list) else [value]:
            if isinstance(child, exp.Expression):
                yield from _selects_postorder(child)
    if isinstance(node, exp.Select):
        yield node


def _scope_of(node: exp.Expression) -> exp.Select | None:
    return node.find_ancestor(exp.Select)


def _clause_of(node: exp.Expression, scope: exp.Select) -> str:
    child = node
    while child.parent is not None and child.parent is not scope:
        child = child.parent
    return child.arg_key


def _conjuncts(where: exp.Expression | None) -> list[exp.Expression]:
    if where is None:
        return []
    cond = where.this if isinstance(where, exp.Where) else where
    return list(cond.flatten()) if isinstance(cond, exp.And) else [cond]


def _has_llm(node: exp.Expression) -> bool:
    return node.find(LLMFunc) is not None


def _pos(node: exp.Expression) -> tuple[int | None, int | None]:
    meta = node.meta or {}
    return meta.get("line"), meta.get("col")


def _move_inner_join_llm_conditions(scope: exp.Select, sql: str) -> None:
    """``JOIN b ON LLM_FILTER(...)`` of inner joins becomes a WHERE conjunct (same meaning)."""
    joins = scope.args.get("joins") or []
    if not any(_has_llm(j) for j in joins):
        return
    if any(j.args.get("side") or (j.args.get("kind") or "").upper() not in ("", "INNER", "CROSS")
           for j in joins):
        line, col = _pos(next(j.find(LLMFunc) for j in joins if _has_llm(j)))  # type: ignore[arg-type]
        msg = (
            f"an LLM function in the ON clause of an outer join cannot be planned (line {line}, "
            f"column {col}); compute it in a subquery or CTE first and join on its result"
        )
        raise UnsupportedError(msg)
    moved: list[exp.Expression] = []
    for join in joins:
        on = join.args.get("on")
        keep = [c for c in _conjuncts(on) if not _has_llm(c)]
        moved += [c for c in _conjuncts(on) if _has_llm(c)]
        join.set("on", exp.and_(*keep) if keep else None)
        if not keep and not join.args.get("using"):
            join.set("kind", "CROSS")
    where = scope.args.get("where")
    scope.set("where", exp.Where(this=exp.and_(*(_conjuncts(where) + moved))))


def _alias_llm_projections(scope: exp.Select) -> None:
    """Name unaliased projections holding LLM calls as written (not as their lookup)."""
    for proj in list(scope.expressions):
        if not isinstance(proj, exp.Alias) and _has_llm(proj):
            proj.replace(exp.alias_(proj.copy(), proj.sql(dialect=LLMSQL), quoted=True))


def llm_filter_groups(tree: exp.Expression) -> list[tuple[int, tuple[int, ...]]]:
    """Scopes whose WHERE has two or more conjuncts that are plain LLM_FILTER calls.

    Returns (scope number, conjunct indexes) pairs: the predicates whose order the
    ``order_llm_predicates`` rule may choose.
    """
    groups = []
    for scope_no, scope in enumerate(list(_selects_postorder(tree.copy()))):
        conj = _conjuncts(scope.args.get("where"))
        plain = [i for i, c in enumerate(conj) if isinstance(c, LLMFunc) and c.spec.predicate
                 and not any(_has_llm(a) for a in c.expressions)]
        if len(plain) >= 2 and len(plain) == sum(1 for c in conj if _has_llm(c)):
            groups.append((scope_no, tuple(plain)))
    return groups


def _scope_calls(
    scope: exp.Select, rank_of: Callable[[int], float]
) -> list[tuple[LLMFunc, int | None]]:
    """LLM calls whose nearest SELECT is ``scope``, in planning order, with the index of
    the WHERE conjunct each one is (None when it is not a whole conjunct).
    """
    found = [n for n in scope.find_all(LLMFunc) if _scope_of(n) is scope]
    conj = _conjuncts(scope.args.get("where"))

    def conj_index(n: LLMFunc) -> int:
        return next((i for i, c in enumerate(conj) if n is c or n in set(c.find_all(LLMFunc))), 0)

    def key(n: LLMFunc) -> tuple[float, float, int, int]:
        clause = _clause_of(n, scope)
        rank = 9 if n.spec.aggregate else _CLAUSE_RANK.get(clause, 5)
        where_rank = rank_of(conj_index(n)) if clause == "where" else 0
        return (rank, where_rank, -n.depth, found.index(n))

    ordered = sorted(found, key=key)
    whole = {id(c): i for i, c in enumerate(conj)}
    return [(n, whole.get(id(n))) for n in ordered]


def _plan_scope(
    scope: exp.Select,
    scope_no: int,
    sql: str,
    query_id: str,
    counter: Iterator[int],
    order: Mapping[tuple[int, int], float],
) -> list[LLMCall]:
    planned: dict[str, exp.Expression] = {}
    calls: list[LLMCall] = []
    for node, conj in _scope_calls(scope, lambda i: order.get((scope_no, i), i)):
        text = node.sql(dialect=LLMSQL)
        if text in planned:  # the same call written twice in one scope: plan it once
            node.replace(planned[text].copy())
            continue
        call = _plan_call(node, scope, sql, f"{query_id}_{next(counter)}")
        if conj is not None:
            call = dataclasses.replace(call, conjunct=(scope_no, conj),
                                       stop_after=_early_stop(scope, node))
        calls.append(call)
        replacement = _lookup_expr(call)
        planned[text] = replacement
        node.replace(replacement.copy())
    return calls


@dataclass(frozen=True, slots=True)
class _Bound:
    instruction: str
    fields: tuple[Field, ...]
    options: CallOptions


def _plan_call(node: LLMFunc, scope: exp.Select, sql: str, call_id: str) -> LLMCall:
    kind = node.kind
    line, col = _pos(node)
    bound = _bind(node, kind, sql)
    template = PromptTemplate.parse(bound.instruction, [f.name for f in bound.fields])
    fields = bound.fields + tuple(
        Field(name, exp.column(name)) for name in template.fields[len(bound.fields) :]
    )
    clause = _clause_of(node, scope)
    keys: tuple[exp.Expression, ...] = ()
    if node.spec.aggregate:
        keys = _group_keys(scope)
        query = _agg_input(scope, fields, keys)
    else:
        query = _input_query(scope, node, clause, fields)
    return LLMCall(
        id=call_id,
        kind=kind,
        template=template,
        fields=fields,
        options=bound.options,
        input=_with_outer_ctes(query, scope),
        lookup=f"__llmsql_{call_id}",
        text=node.sql(dialect=LLMSQL),
        clause=_CLAUSE_NAMES.get(clause, clause.upper()),
        group_keys=keys,
        line=line,
        col=col,
    )


# ---- binding the call's arguments ---------------------------------------------------------


def _bind(node: LLMFunc, kind: CallKind, sql: str) -> _Bound:
    args = list(node.expressions)
    name = kind.value
    line, col = _pos(node)
    if not args or not (isinstance(args[0], exp.Literal) and args[0].is_string):
        msg = (
            f"the first argument of {name} must be the instruction as a string literal, "
            f"e.g. {name}('Is the review positive?', review)"
        )
        raise PlanError(
            msg,
            sql=sql, line=line, col=col,
        )
    options: dict[str, object] = {}
    fields: list[Field] = []
    for arg in args[1:]:
        if isinstance(arg, (exp.Kwarg, exp.PropertyEQ)):
            key = arg.this.name.lower()
            if key in options:
                msg = f"{name} option {key!r} is given twice"
                raise PlanError(msg, sql=sql, line=line, col=col)
            options[key] = option_value(arg.expression, key, name, sql, line, col)
        else:
            fields.append(_field(arg, name, sql))
    _check_unique(fields, name, sql, line, col)
    return _Bound(args[0].name, tuple(fields), _options(options, kind, sql, line, col))


def _field(arg: exp.Expression, func: str, sql: str) -> Field:
    if isinstance(arg, exp.Star) or (isinstance(arg, exp.Column) and arg.is_star):
        line, col = _pos(arg)
        msg = (
            f"{func} does not take *; list the fields to put in the prompt, e.g. {func}('...', "
            "title, review)"
        )
        raise PlanError(
            msg, sql=sql, line=line, col=col,
        )
    name = arg.name if isinstance(arg, exp.Column) else arg.sql(dialect=LLMSQL)
    return Field(name, arg)


def _check_unique(fields: list[Field], func: str, sql: str, line: int | None,
                  col: int | None) -> None:
    seen: set[str] = set()
    for f in fields:
        if f.name in seen:
            msg = (
                f"{func} has two fields named {f.name!r}; a prompt field's name is its column "
                "name, so rename one in a subquery or CTE (SELECT x AS other_name ...)"
            )
            raise PlanError(
                msg,
                sql=sql, line=line, col=col,
            )
        seen.add(f.name)


def option_value(
    value: exp.Expression, key: str, func: str, sql: str, line: int | None, col: int | None
) -> object:
    """A call option's constant value (string, number, boolean or list of strings); a
    PlanError naming ``func`` and ``key`` for anything else.
    """
    if isinstance(value, exp.Literal):
        return value.name if value.is_string else _number(value.name)
    if isinstance(value, exp.Neg) and isinstance(value.this, exp.Literal):
        return -_number(value.this.name)
    if isinstance(value, exp.Boolean):
        return bool(value.this)
    if isinstance(value, exp.Array) and all(
        isinstance(e, exp.Literal) and e.is_string for e in value.expressions
    ):
        return tuple(e.name for e in value.expressions)
    msg = (
        f"{func} option {key!r} must be a constant (a string, number, boolean or list of "
        f"strings), got {value.sql(dialect=LLMSQL)!r}"
    )
    raise PlanError(
        msg, sql=sql, line=line, col=col,
    )


def _number(text: str) -> float | int:
    return float(text) if any(c in text for c in ".eE") else int(text)


def _options(
    raw: dict[str, object], kind: CallKind, sql: str, line: int | None, col: int | None
) -> CallOptions:
    func = kind.value

    def fail(msg: str) -> PlanError:
        return PlanError(f"{func}: {msg}", sql=sql, line=line, col=col)

    unknown = sorted(set(raw) - set(OPTION_NAMES))
    if unknown:
        msg = f"unknown option {unknown[0]!r}; the options are {', '.join(OPTION_NAMES)}"
        raise fail(msg)
    model = raw.get("model")
    if model is not None and not isinstance(model, str):
        msg = "option 'model' must be a string"
        raise fail(msg)
    max_tokens = raw.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                   or max_tokens <= 0):
        msg = f"option 'max_tokens' must be a positive integer, got {max_tokens!r}"
        raise fail(msg)
    temperature = raw.get("temperature", 0.0)
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or temperature < 0):
        msg = f"option 'temperature' must be a number >= 0, got {temperature!r}"
        raise fail(msg)
    seed = raw.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        msg = f"option 'seed' must be an integer, got {seed!r}"
        raise fail(msg)
    truncate = raw.get("truncate", False)
    if not isinstance(truncate, bool):
        msg = f"option 'truncate' must be true or false, got {truncate!r}"
        raise fail(msg)
    adapter = raw.get("adapter")
    if adapter is not None and (not isinstance(adapter, str) or not adapter.strip()):
        msg = (f"option 'adapter' must be an adapter's name as a string literal, got "
               f"{adapter!r}; e.g. adapter => 'fresh' (SHOW ADAPTERS lists them)")
        raise fail(msg)
    return CallOptions(
        model=model, max_tokens=max_tokens, temperature=float(temperature), seed=seed,
        truncate=truncate, adapter=adapter, **_own_options(raw, kind, fail),
    )


def _own_options(raw: dict[str, object], kind: CallKind,
                 fail: Callable[[str], PlanError]) -> dict[str, object]:
    """The options only some functions take, checked by the spec that takes them."""
    own = {r.name: r for r in kind.spec.options}
    for name in sorted(set(raw) - set(COMMON_OPTIONS) - set(own)):
        owner = next(s.name for s in SPECS.values() if any(r.name == name for r in s.options))
        msg = f"option {name!r} belongs to {owner}"
        raise fail(msg)
    out = {}
    for name, rule in own.items():
        try:
            out[name] = rule.check(raw.get(name))
        except ValueError as exc:
            raise fail(str(exc)) from None
    return out


# ---- input queries and lookups -------------------------------------------------------------


def _has_aggregate(node: exp.Expression) -> bool:
    """True when ``node`` holds an aggregate of its own scope (not of a subquery)."""
    home = _scope_of(node)
    return any(_scope_of(a) is home for a in node.find_all(exp.AggFunc))


def _base_query(scope: exp.Select, exclude: exp.Expression | None) -> exp.Select:
    """SELECT ... FROM scope's sources WHERE its LLM-free conjuncts (except ``exclude``)."""
    q = scope.copy()
    for key in ("order", "limit", "offset", "qualify", "windows", "distinct", "having", "group",
                "with_", "sort", "cluster", "distribute"):
        q.set(key, None)
    conj = [c for c in _conjuncts(scope.args.get("where")) if c is not exclude and not _has_llm(c)]
    q.set("where", exp.Where(this=exp.and_(*[c.copy() for c in conj])) if conj else None)
    if scope.args.get("with_") is not None:
        q.set("with_", scope.args["with_"].copy())
    return q


def _own_conjunct(node: exp.Expression, scope: exp.Select) -> exp.Expression | None:
    for c in _conjuncts(scope.args.get("where")):
        if node is c or any(node is n for n in c.find_all(LLMFunc)):
            return c
    return None


def _input_query(
    scope: exp.Select, node: LLMFunc, clause: str, fields: tuple[Field, ...]
) -> exp.Expression:
    own = _own_conjunct(node, scope) if clause == "where" else None
    q = _base_query(scope, own)
    cols = [exp.alias_(f.expr.copy(), f"{ARG_PREFIX}{i}") for i, f in enumerate(fields)]
    if not cols:
        cols = [exp.alias_(exp.true(), f"{ARG_PREFIX}k")]
    q.set("expressions", cols)
    if any(_has_aggregate(f.expr) for f in fields):
        q.set("group", scope.args["group"].copy() if scope.args.get("group") else None)
        having = [c for c in _conjuncts(scope.args.get("having")) if not _has_llm(c)]
        q.set("having", exp.Having(this=exp.and_(*[c.copy() for c in having])) if having else None)
    elif _limit_applies(scope, clause):
        q.set("limit", scope.args["limit"].copy())
        if scope.args.get("offset") is not None:
            q.set("offset", scope.args["offset"].copy())
    # No DISTINCT: rows come in table order (the "table order" baseline) and the
    # dedup_prompts rule collapses repeats; the lookup keeps one row per distinct input.
    return q


def _limit_applies(scope: exp.Select, clause: str) -> bool:
    """A LIMIT without ORDER BY over one table's scan bounds the LLM work of SELECT calls."""
    return (
        clause == "expressions"
        and scope.args.get("limit") is not None
        and not scope.args.get("order")
        and not scope.args.get("group")
        and not scope.args.get("distinct")
        and not scope.args.get("joins")
        and not _has_llm(scope.args.get("where") or exp.true())
        and isinstance((scope.args.get("from_") or exp.From()).this, exp.Table)
        and not any(isinstance(e, exp.AggFunc) or e.find(exp.AggFunc, exp.Window)
                    for e in scope.expressions)
    )


def _int_literal(node: exp.Expression | None) -> int | None:
    value = node.expression if isinstance(node, (exp.Limit, exp.Offset)) else node
    if isinstance(value, exp.Literal) and not value.is_string and value.name.isdigit():
        return int(value.name)
    return None


def _early_stop(scope: exp.Select, node: LLMFunc) -> int | None:
    """Rows needed when ``node`` is the only LLM conjunct of a LIMIT scope without ORDER BY.

    Every input row of such a filter is one row of the scope, so once this many passed,
    further answers cannot change which rows the LIMIT may return.
    """
    limit = _int_literal(scope.args.get("limit"))
    offset = _int_literal(scope.args.get("offset")) if scope.args.get("offset") else 0
    if limit is None or offset is None or not node.spec.predicate:
        return None
    if any(scope.args.get(k) for k in ("order", "group", "distinct", "having", "qualify")):
        return None
    if any(e.find(exp.AggFunc, exp.Window) for e in scope.expressions):
        return None
    llm_conjuncts = [c for c in _conjuncts(scope.args.get("where")) if _has_llm(c)]
    return limit + offset if llm_conjuncts == [node] else None


def _group_keys(scope: exp.Select) -> tuple[exp.Expression, ...]:
    group = scope.args.get("group")
    if group is None:
        return ()
    aliases = {e.alias: e.this for e in scope.expressions if isinstance(e, exp.Alias)}
    if group.args.get("all"):
        return tuple(
            (e.this if isinstance(e, exp.Alias) else e).copy()
            for e in scope.expressions if not e.find(exp.AggFunc)
        )
    keys = []
    for g in group.expressions:
        if isinstance(g, exp.Literal) and not g.is_string:
            target = scope.expressions[int(g.name) - 1]
            keys.append((target.this if isinstance(target, exp.Alias) else target).copy())
        elif isinstance(g, exp.Column) and not g.table and g.name in aliases:
            keys.append(aliases[g.name].copy())
        else:
            keys.append(g.copy())
    return tuple(keys)


def _agg_input(
    scope: exp.Select, fields: tuple[Field, ...], keys: tuple[exp.Expression, ...]
) -> exp.Expression:
    q = _base_query(scope, None)
    cols = [exp.alias_(k.copy(), f"{GROUP_PREFIX}{i}") for i, k in enumerate(keys)]
    cols += [exp.alias_(f.expr.copy(), f"{ARG_PREFIX}{i}") for i, f in enumerate(fields)]
    q.set("expressions", cols or [exp.alias_(exp.true(), f"{ARG_PREFIX}k")])
    return q


def _with_outer_ctes(query: exp.Expression, scope: exp.Select) -> exp.Expression:
    """Attach the CTEs visible from ``scope`` that are defined in its ancestors."""
    ctes: list[exp.Expression] = []
    child: exp.Expression = scope
    for anc in iter(lambda: child.parent, None):  # noqa: B023 - reads the child the loop advances
        with_ = anc.args.get("with_") if isinstance(anc, exp.Expression) else None
        if with_ is not None and with_ is not child:
            visible = []
            for cte in with_.expressions:
                if cte is child or scope in set(cte.find_all(exp.Select)):
                    break
                visible.append(cte.copy())
            ctes = visible + ctes
        elif with_ is child:
            for cte in with_.expressions:
                if scope in set(cte.find_all(exp.Select)):
                    break
                ctes.append(cte.copy())
        child = anc
    if not ctes:
        return query
    own = query.args.get("with_")
    all_ctes = ctes + (list(own.expressions) if own is not None else [])
    query.set("with_", exp.With(expressions=all_ctes))
    return query


def _lookup_expr(call: LLMCall) -> exp.Expression:
    alias = f"__llmsql_r_{call.id}"
    aggregate = call.kind.spec.aggregate
    if aggregate:
        pairs = [(f"{GROUP_PREFIX}{i}", k) for i, k in enumerate(call.group_keys)]
    else:
        pairs = [(f"{ARG_PREFIX}{i}", f.expr) for i, f in enumerate(call.fields)]
    sel = exp.select(exp.column(RESULT_COL, table=alias)).from_(
        exp.to_table(call.lookup).as_(alias)
    )
    conds = [exp.NullSafeEQ(this=exp.column(c, table=alias), expression=e.copy()) for c, e in pairs]
    if conds:
        sel = sel.where(exp.and_(*conds))
    sub = exp.Subquery(this=sel)
    if aggregate:
        return exp.AnyValue(this=sub)
    return sub


def sampled(query: exp.Expression, rows: int, /, *, seed: int = 7) -> exp.Expression:
    """``query`` reduced to a reproducible reservoir sample of ``rows`` rows."""
    sample = exp.TableSample(method=exp.var("RESERVOIR"), size=exp.Literal.number(rows),
                             seed=exp.Literal.number(seed))
    sub = exp.Subquery(this=query.copy(), alias=exp.TableAlias(this=exp.to_identifier(
        "__llmsql_sample")), sample=sample)
    return exp.select("*").from_(sub)


def _reject_leftover_calls(work: exp.Expression, sql: str) -> None:
    for node in work.find_all(LLMFunc):
        line, col = _pos(node)
        msg = (
            f"{node.sql_name()} at line {line}, column {col} is outside any SELECT scope "
            "llmsql can plan; move it into a SELECT"
        )
        raise UnsupportedError(msg)
