"""Plan SQL (llmsql's DuckDB dialect) as Spark SQL that Spark can plan well (pure sqlglot).

The planner reads an LLM call's answers with a correlated scalar subquery::

    (SELECT r.__llmsql_result FROM __llmsql_q1_1 AS r
     WHERE r.__llmsql_a0 IS NOT DISTINCT FROM review AND ...)

Spark 4 runs that shape, with three problems, each fixed by one rewrite here:

1. ``<=>`` correlation is decorrelated into a *broadcast nested-loop* join (rows x lookup
   rows). :func:`hash_joinable` compares one ``named_struct`` per side with ``=`` instead:
   struct equality is null-safe field by field in Spark, and Spark turns it into a hash join.
2. A lookup whose key holds another lookup (``LLM('a', LLM('b', x))``) references a column two
   scopes up, which Spark cannot resolve. :func:`hoist_nested` turns the inner lookups into
   ``LEFT JOIN`` s of their home SELECT (a lookup has one row per key, so a left join never
   duplicates a row) and the outer key reads the joined column.
3. In a GROUP BY scope a correlated subquery outside any aggregate is refused unless it is a
   grouping expression. :func:`wrap_ungrouped` wraps such lookups in ``ANY_VALUE``: the query
   is only valid when their keys are determined by the group, so the value is the same.

:func:`spark_sql` applies all of them, plus a portable reservoir sample, and generates the
Spark text. DuckDB never sees these rewrites.

>>> import sqlglot
>>> q = sqlglot.parse_one("SELECT (SELECT r.__llmsql_result FROM __llmsql_q_1 AS r "
...                       "WHERE r.__llmsql_a0 IS NOT DISTINCT FROM x) FROM t")
>>> print(spark_sql(q).replace(" WHERE", "\\nWHERE"))
SELECT (SELECT r.__llmsql_result FROM __llmsql_q_1 AS r
WHERE NAMED_STRUCT('k0', r.__llmsql_a0) = NAMED_STRUCT('k0', x)) FROM t
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlglot import exp

from llmsql.errors import UnsupportedError
from llmsql.plan import RESULT_COL

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["LookupRef", "as_lookup", "hash_joinable", "hoist_nested", "spark_sql",
           "wrap_ungrouped"]

LOOKUP_PREFIX = "__llmsql_"
JOIN_ALIAS = "__llmsql_j"


@dataclass(frozen=True, slots=True)
class LookupRef:
    """A lookup subquery found in a tree: the view it reads and its key pairs."""

    node: exp.Subquery
    table: str
    alias: str
    pairs: tuple[tuple[str, exp.Expr], ...]
    """``(lookup column, outer expression)`` compared with IS NOT DISTINCT FROM."""


def _conjuncts(node: exp.Expr | None) -> list[exp.Expr]:
    if node is None:
        return []
    cond = node.this if isinstance(node, exp.Where) else node
    return list(cond.flatten()) if isinstance(cond, exp.And) else [cond]


def as_lookup(node: exp.Expr, /) -> LookupRef | None:
    """The lookup ``node`` is, or None when it is any other expression."""
    if not isinstance(node, exp.Subquery) or not isinstance(node.this, exp.Select):
        return None
    sel = node.this
    source = sel.args.get("from_")
    table = source.this if source is not None else None
    if (not isinstance(table, exp.Table) or not table.name.startswith(LOOKUP_PREFIX)
            or sel.args.get("joins") or len(sel.expressions) != 1
            or sel.expressions[0].name != RESULT_COL):
        return None
    alias = table.alias_or_name
    pairs: list[tuple[str, exp.Expr]] = []
    for cond in _conjuncts(sel.args.get("where")):
        left = cond.this if isinstance(cond, exp.NullSafeEQ) else None
        if not isinstance(left, exp.Column) or left.table != alias:
            return None
        pairs.append((left.name, cond.expression))
    return LookupRef(node, table.name, alias, tuple(pairs))


def _lookups(root: exp.Expr) -> list[LookupRef]:
    """Every lookup under ``root``, inner ones before the lookups that contain them."""
    found = [ref for node in root.walk(bfs=False) if (ref := as_lookup(node)) is not None]
    return found[::-1]


def _home(ref: LookupRef) -> exp.Select | None:
    """The nearest SELECT around the lookup that is not itself a lookup."""
    node = ref.node.parent
    while node is not None:
        if isinstance(node, exp.Select) and not (
            isinstance(node.parent, exp.Subquery) and as_lookup(node.parent) is not None
        ):
            return node
        node = node.parent
    return None


def _inside_lookup(ref: LookupRef, home: exp.Select) -> bool:
    node = ref.node.parent
    while node is not None and node is not home:
        if as_lookup(node) is not None:
            return True
        node = node.parent
    return False


# ---- 2. nested lookups become LEFT JOINs --------------------------------------------------


def _expand_star(scope: exp.Select) -> None:
    """``SELECT *`` -> one qualified star per source, so added joins add no columns."""
    if not any(isinstance(e, exp.Star) for e in scope.expressions):
        return
    joins = scope.args.get("joins") or []
    if any(j.args.get("using") or (j.args.get("method") or "").upper() == "NATURAL"
           for j in joins):
        msg = (
            "a nested LLM call in a SELECT * over a USING or NATURAL join cannot run on Spark; "
            "list the columns instead of *"
        )
        raise UnsupportedError(msg)
    sources = [scope.args["from_"].this, *(j.this for j in joins)]
    stars: list[exp.Expr] = [
        exp.Column(this=exp.Star(), table=exp.to_identifier(s.alias_or_name)) for s in sources
    ]
    new: list[exp.Expr] = []
    for e in scope.expressions:
        new.extend(s.copy() for s in stars) if isinstance(e, exp.Star) else new.append(e)
    scope.set("expressions", new)


def hoist_nested(root: exp.Expr, /) -> exp.Expr:
    """Turn lookups nested in another lookup's key into LEFT JOINs of their home SELECT.

    Modifies and returns ``root``.
    """
    counter = itertools.count(1)
    for ref in _lookups(root):
        home = _home(ref)
        if home is None or not _inside_lookup(ref, home) or home.args.get("from_") is None:
            continue
        _expand_star(home)
        alias = f"{JOIN_ALIAS}{next(counter)}"
        on = exp.and_(*[
            exp.NullSafeEQ(this=exp.column(col, table=alias), expression=e.copy())
            for col, e in ref.pairs
        ]) if ref.pairs else exp.true()
        home.append("joins", exp.Join(this=exp.to_table(ref.table).as_(alias), side="LEFT",
                                      on=on))
        ref.node.replace(exp.column(RESULT_COL, table=alias))
    return root


# ---- 1. hash-joinable correlation ------------------------------------------------------------


def _struct(values: Sequence[exp.Expr]) -> exp.Expr:
    args: list[exp.Expr] = []
    for i, v in enumerate(values):
        args += [exp.Literal.string(f"k{i}"), v]
    return exp.Anonymous(this="NAMED_STRUCT", expressions=args)


def hash_joinable(root: exp.Expr, /) -> exp.Expr:
    """Compare a lookup's keys as one struct with ``=`` (Spark plans a hash join).

    Modifies and returns ``root``.
    """
    for ref in _lookups(root):
        if not ref.pairs:
            continue
        left = [exp.column(col, table=ref.alias) for col, _ in ref.pairs]
        right = [e.copy() for _, e in ref.pairs]
        ref.node.this.set("where", exp.Where(this=exp.EQ(this=_struct(left),
                                                         expression=_struct(right))))
    return root


# ---- 3. lookups of a GROUP BY scope outside aggregates -------------------------------------


def _is_aggregate_scope(scope: exp.Select) -> bool:
    if scope.args.get("group") is not None:
        return True
    return any(a.find_ancestor(exp.Select) is scope for e in scope.expressions
               for a in e.find_all(exp.AggFunc))


def _in_aggregate(node: exp.Expr, scope: exp.Select) -> bool:
    parent = node.parent
    while parent is not None and parent is not scope:
        if isinstance(parent, exp.AggFunc):
            return True
        parent = parent.parent
    return False


def _clause_child(node: exp.Expr, scope: exp.Select) -> exp.Expr:
    child = node
    while child.parent is not None and child.parent is not scope:
        child = child.parent
    return child


def _grouped_projection(child: exp.Expr, scope: exp.Select) -> bool:
    """True when a SELECT item is named in GROUP BY (by alias or by ordinal)."""
    group = scope.args.get("group")
    if group is None or child.arg_key != "expressions":
        return False
    position = scope.expressions.index(child) + 1 if child in scope.expressions else 0
    for g in group.expressions:
        if isinstance(g, exp.Literal) and not g.is_string and g.name == str(position):
            return True
        if isinstance(g, exp.Column) and not g.table and g.name == child.alias_or_name:
            return True
    return False


def wrap_ungrouped(root: exp.Expr, /) -> exp.Expr:
    """Wrap lookups used outside aggregates of a GROUP BY scope in ``ANY_VALUE``.

    Modifies and returns ``root``.
    """
    for ref in _lookups(root):
        scope = _home(ref)
        if scope is None or not _is_aggregate_scope(scope) or _inside_lookup(ref, scope):
            continue
        if _in_aggregate(ref.node, scope):
            continue
        child = _clause_child(ref.node, scope)
        if child.arg_key in ("group", "where", "joins") or _grouped_projection(child, scope):
            continue
        ref.node.replace(exp.AnyValue(this=ref.node.copy()))
    return root


# ---- samples ---------------------------------------------------------------------------------


def portable_samples(root: exp.Expr, /) -> exp.Expr:
    """``(q) TABLESAMPLE RESERVOIR (n ROWS) REPEATABLE (s)`` -> a seeded ORDER BY rand LIMIT.

    Modifies and returns ``root``.
    """
    for sub in list(root.find_all(exp.Subquery)):
        sample = sub.args.get("sample")
        size = sample.args.get("size") if isinstance(sample, exp.TableSample) else None
        if size is None:
            continue
        seed = sample.args.get("seed") if sample is not None else None
        rand = exp.Rand(this=seed.copy()) if seed is not None else exp.Rand()
        inner = exp.select("*").from_(exp.Subquery(this=sub.this.copy(), alias=exp.TableAlias(
            this=exp.to_identifier("__llmsql_s")))).order_by(rand).limit(size.copy())
        sub.set("this", inner)
        sub.set("sample", None)
    return root


def spark_sql(tree: exp.Expr, /) -> str:
    """``tree`` as Spark SQL text, with every rewrite of this module applied to a copy."""
    work = tree.copy()
    for rewrite in (portable_samples, hoist_nested, wrap_ungrouped, hash_joinable):
        work = rewrite(work)
    return work.sql(dialect="spark")
