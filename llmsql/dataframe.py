"""LLM operators on DataFrames: ``df.llm.filter/map/classify/extract/score/agg``.

Every operator is planned as one SQL query over the frame, registered in a
:class:`~llmsql.session.Session` for the duration of the call, so it runs through the same
planner, optimizer (dedup, prompt ordering for prefix-cache reuse, batching) and backends
as ``Session.sql``; nothing loops over rows in Python. Column names and values are built
as sqlglot nodes and rendered by the dialect, so they are always quoted, never spliced
into SQL text.

The frame may be a pandas DataFrame (``df.llm``), a polars DataFrame (``pl_df.llm``) or a
pyarrow Table (``llmsql.frame(data)``); results come back as the same kind of frame.
``import llmsql`` imports neither pandas nor polars: ``df.llm`` and ``pl_df.llm`` are
registered as soon as the library is imported, before or after llmsql (see
:func:`register_on_import`). Only the columns a call needs are handed to the engine, as
Arrow (zero-copy for Arrow and polars input); rows keep their order and, for pandas, their
index. Grouped answers:
``df.llm.agg(instruction, *fields, by=[...])`` or ``df.groupby([...]).llm.agg(...)``.

>>> import llmsql, pandas as pd
>>> con = llmsql.connect(dry_run=True, progress=False)
>>> df = pd.DataFrame({"id": [1, 2], "review": ["great", "bad"]})
>>> df.llm.filter("Is the review positive?", "review", session=con)["id"].tolist()
[1, 2]
>>> df.llm.classify("Tone?", "review", labels=["pos", "neg"], session=con)["label"].tolist()
['pos', 'pos']
>>> con.close()

This module is over the 500-line guideline because each of the six functions' accessor
methods carries a full docstring with its own runnable example; the code they share is a
few small helpers.
"""

from __future__ import annotations

import difflib
import itertools
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from sqlglot import exp

from llmsql.convert import (
    ROW_COL,
    FrameKind,
    column_labels,
    frame_kind,
    from_arrow,
    take,
    to_arrow,
    with_columns,
)
from llmsql.dialect import LLMSQL, NODES, LLMFunc
from llmsql.errors import PlanError, UnsupportedError
from llmsql.frames import registered, resolve_session
from llmsql.udfs import CallKind
from llmsql.udfs.prompts import placeholders

if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec
    from types import ModuleType

    import pandas as pd

    from llmsql.session import Session

OUT_COL = "__llmsql_out"
"""The name of the LLM result in generated queries."""

_frame_ids = itertools.count(1)


# ---- building the query -------------------------------------------------------------------------


def _literal(value: object, name: str) -> exp.Expression:
    """An option value as a SQL constant (never as SQL text)."""
    if isinstance(value, bool):
        return exp.Boolean(this=value)
    if isinstance(value, str):
        return exp.Literal.string(value)
    if isinstance(value, (Integral, Real)):
        return exp.Literal.number(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return exp.Array(expressions=[exp.Literal.string(v) for v in value])
    msg = (
        f"option {name!r} must be a string, number, boolean or list of strings, got "
        f"{type(value).__name__}"
    )
    raise PlanError(msg)


def _col(name: str) -> exp.Column:
    return exp.column(name, quoted=True)


@dataclass(frozen=True, slots=True)
class Options:
    """Per-call options, as in SQL (``model => ...``); None means the default."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    truncate: bool = False
    adapter: str | None = None

    def pairs(self) -> list[tuple[str, object]]:
        """The options that were set, as ``(name, value)`` in a fixed order."""
        items = [("model", self.model), ("max_tokens", self.max_tokens),
                 ("temperature", self.temperature), ("seed", self.seed)]
        out: list[tuple[str, object]] = [(k, v) for k, v in items if v is not None]
        out += [("truncate", True)] if self.truncate else []
        return [*out, ("adapter", self.adapter)] if self.adapter is not None else out


def llm_call(
    kind: CallKind, instruction: str, fields: Sequence[str], /,
    options: Sequence[tuple[str, object]] = (),
) -> LLMFunc:
    """The LLM function node ``KIND('instruction', name => value, ..., "field", ...)``.

    >>> llm_call(CallKind.FILTER, "It's good?", ["my col"], [("max_tokens", 4)]).sql("llmsql")
    'LLM_FILTER(\\'It\\'\\'s good?\\', max_tokens => 4, "my col")'
    """
    args: list[exp.Expression] = [exp.Literal.string(instruction)]
    args += [exp.Kwarg(this=exp.var(k), expression=_literal(v, k)) for k, v in options]
    args += [_col(f) for f in fields]
    return NODES[kind.value](expressions=args)


def _schema_text(schema: str | Mapping[str, str]) -> str:
    if isinstance(schema, str):
        return schema
    if isinstance(schema, Mapping) and schema:
        return ", ".join(f"{k} {v}" for k, v in schema.items())
    msg = (
        "llm.extract(): 'schema' must be 'name TYPE, ...' or a dict {name: type}, e.g. "
        "{'person': 'VARCHAR', 'year': 'INTEGER'}"
    )
    raise PlanError(msg)


def _check_labels(labels: Sequence[str]) -> tuple[str, ...]:
    if isinstance(labels, str) or not all(isinstance(x, str) for x in labels):
        msg = (
            "llm.classify(): 'labels' must be a list of strings, e.g. labels=['pos', 'neg'], "
            f"got {labels!r}"
        )
        raise PlanError(msg)
    return tuple(labels)


class LLMFrame:
    """LLM operators over one frame, each planned as a single SQL query.

    ``df.llm`` on a pandas DataFrame is this class; ``llmsql.frame(data)`` wraps polars
    DataFrames and pyarrow Tables too.

    Args:
        data: a pandas or polars DataFrame, or a pyarrow Table.
        session: the session to run on; each method's ``session`` overrides it (default:
            :func:`default_session`).
    """

    def __init__(self, data: Any, /, *, session: Session | None = None) -> None:
        self._data = data
        self._kind = frame_kind(data)
        self._session = session

    def filter(
        self, instruction: str, /, *fields: str, session: Session | None = None,
        model: str | None = None, max_tokens: int | None = None,
        temperature: float | None = None, seed: int | None = None, truncate: bool = False,
        adapter: str | None = None,
    ) -> Any:
        """The rows for which the model answers Yes (``LLM_FILTER`` in WHERE).

        Args:
            instruction: a yes/no question; ``{column}`` placeholders are filled in.
            *fields: columns put in the prompt as ``name: value`` lines.
            session: the session to run on.
            model, max_tokens, temperature, seed, truncate: as the SQL options.
            adapter: a LoRA adapter of the session to run the call with (``adapter =>``;
                see :meth:`create_adapter`).

        Returns:
            The kept rows, in their original order (pandas: original index).

        Raises:
            PlanError: an unknown column or a bad option.
        """
        opts = Options(model, max_tokens, temperature, seed, truncate, adapter)
        call = self._call(CallKind.FILTER, instruction, fields, opts.pairs(), "filter")
        query = exp.select(_col(ROW_COL)).where(call).order_by(_col(ROW_COL))
        table = self._run(query, call, session, "filter")
        return take(self._data, self._kind, table.column(ROW_COL))

    def map(
        self, instruction: str, /, *fields: str, column: str = "answer",
        session: Session | None = None, model: str | None = None,
        max_tokens: int | None = None, temperature: float | None = None,
        seed: int | None = None, truncate: bool = False, adapter: str | None = None,
    ) -> Any:
        """Free-text answers per row (``LLM``), added as ``column``.

        Args:
            instruction: what to write; ``{column}`` placeholders are filled in.
            *fields: columns put in the prompt.
            column: the name of the new column (an existing one is replaced).
            session, model, max_tokens, temperature, seed, truncate, adapter: as for
                :meth:`filter`.

        Returns:
            A new frame with ``column`` added.
        """
        opts = Options(model, max_tokens, temperature, seed, truncate, adapter)
        call = self._call(CallKind.MAP, instruction, fields, opts.pairs(), "map")
        return self._add(call, column, session, "map")

    def classify(
        self, instruction: str, /, *fields: str, labels: Sequence[str],
        column: str = "label", session: Session | None = None, model: str | None = None,
        max_tokens: int | None = None, temperature: float | None = None,
        seed: int | None = None, truncate: bool = False, adapter: str | None = None,
    ) -> Any:
        """One of ``labels`` per row (``LLM_CLASSIFY``), added as ``column``.

        Args:
            instruction: the question whose answer is a label.
            *fields: columns put in the prompt.
            labels: at least two distinct labels.
            column: the name of the new column.
            session, model, max_tokens, temperature, seed, truncate, adapter: as for
                :meth:`filter`.

        Returns:
            A new frame with ``column`` added (NULL where no label matched).

        Raises:
            PlanError: bad labels, an unknown column or a bad option.
        """
        opts = [("labels", _check_labels(labels)),
                *Options(model, max_tokens, temperature, seed, truncate, adapter).pairs()]
        call = self._call(CallKind.CLASSIFY, instruction, fields, opts, "classify")
        return self._add(call, column, session, "classify")

    def extract(
        self, instruction: str, /, *fields: str, schema: str | Mapping[str, str],
        column: str | None = None, session: Session | None = None, model: str | None = None,
        max_tokens: int | None = None, temperature: float | None = None,
        seed: int | None = None, truncate: bool = False, adapter: str | None = None,
    ) -> Any:
        """Typed fields per row (``LLM_EXTRACT``).

        Args:
            instruction: what to extract.
            *fields: columns put in the prompt.
            schema: ``'name TYPE, ...'`` or ``{name: TYPE}`` (VARCHAR, INTEGER, BIGINT,
                DOUBLE, FLOAT, BOOLEAN, DATE).
            column: None: one new column per schema field; a name: one struct column
                (dicts in pandas).
            session, model, max_tokens, temperature, seed, truncate, adapter: as for
                :meth:`filter`.

        Returns:
            A new frame with the extracted columns added (NULL where the answer failed).
        """
        opts = [("schema", _schema_text(schema)),
                *Options(model, max_tokens, temperature, seed, truncate, adapter).pairs()]
        call = self._call(CallKind.EXTRACT, instruction, fields, opts, "extract")
        if column is not None:
            return self._add(call, column, session, "extract")
        table = self._run(_per_row(call), call, session, "extract")
        struct = table.column(OUT_COL).combine_chunks()
        children = {struct.type.field(i).name: pa.chunked_array([child])
                    for i, child in enumerate(struct.flatten())}
        return with_columns(self._data, self._kind, children)

    def score(
        self, instruction: str, /, *fields: str, column: str = "score",
        session: Session | None = None, model: str | None = None,
        max_tokens: int | None = None, temperature: float | None = None,
        seed: int | None = None, truncate: bool = False, adapter: str | None = None,
    ) -> Any:
        """How likely the answer is Yes, per row (``LLM_SCORE``), added as ``column``.

        Args:
            instruction: a yes/no question; ``{column}`` placeholders are filled in.
            *fields: columns put in the prompt.
            column: the name of the new column (an existing one is replaced).
            session, model, max_tokens, temperature, seed, truncate, adapter: as for
                :meth:`filter`.

        Returns:
            A new frame with ``column`` added: a float in [0, 1] (P(Yes) where the backend
            gives probabilities, else the number the model answered), NULL where none.
        """
        opts = Options(model, max_tokens, temperature, seed, truncate, adapter)
        call = self._call(CallKind.SCORE, instruction, fields, opts.pairs(), "score")
        return self._add(call, column, session, "score")

    def agg(
        self, instruction: str, /, *fields: str, by: str | Sequence[str] = (),
        column: str | None = None, sort: bool = True, dropna: bool = True,
        as_index: bool = True, session: Session | None = None, model: str | None = None,
        max_tokens: int | None = None, temperature: float | None = None,
        seed: int | None = None, truncate: bool = False, adapter: str | None = None,
    ) -> Any:
        """One answer per group over all its rows (``LLM_AGG`` with ``GROUP BY by``).

        Args:
            instruction: what to answer about each group.
            *fields: columns of each row put in the group's prompt.
            by: group-key columns; empty: the whole frame is one group.
            column: the name of the answer column. None (the default): ``answer``, or, if
                the frame has a column of that name, ``answer_1`` (``answer_2``, ...: the
                first name the frame does not use), so it never clashes with a group key.
            sort, dropna: as in ``DataFrame.groupby`` (NULL keys dropped; sorted keys).
            as_index: pandas only: group keys as the index (as ``groupby`` does).
            session, model, max_tokens, temperature, seed, truncate, adapter: as for
                :meth:`filter`.

        Returns:
            With ``by``: a frame of the group keys and ``column``. Without: the one answer.

        Raises:
            PlanError: an unknown column, a bad option, or ``column`` naming a group key.
        """
        keys = [by] if isinstance(by, str) else list(by)
        self._check_columns(keys, "agg")
        column = self._agg_column(column, keys)
        opts = Options(model, max_tokens, temperature, seed, truncate, adapter)
        call = self._call(CallKind.AGG, instruction, fields, opts.pairs(), "agg")
        query = _group_query(call, keys, sort=sort, dropna=dropna)
        table = self._run(query, call, session, "agg", extra=keys)
        table = table.rename_columns([*table.column_names[:-1], column])
        if not keys:
            return table.column(column)[0].as_py()
        out = from_arrow(table, self._kind)
        if self._kind is FrameKind.PANDAS and as_index:
            out = out.set_index(keys)
        return out

    def create_adapter(
        self, name: str, instruction: str, /, *fields: str, label: str,
        function: str = "filter", labels: Sequence[str] | None = None,
        schema: str | Mapping[str, str] | None = None, session: Session | None = None,
        asynchronous: bool = False, **lora: Any,
    ) -> Any:
        """Train the LoRA adapter ``name`` on this frame's rows (``CREATE ADAPTER``) for the
        call ``function(instruction, *fields)``; later calls take ``adapter=name``.

        Args:
            name: the adapter's name (letters, digits, ``_``).
            instruction: the call's instruction, as the calls that will use it write it.
            *fields: the call's prompt columns.
            label: the column holding each row's expected answer (``filter``: booleans,
                0/1 or yes/no; ``classify``: one of ``labels``; ``map``: text;
                ``extract``: a dict or JSON with the schema's fields).
            function: ``filter``, ``classify``, ``map`` or ``extract``.
            labels, schema: the call's options for ``classify`` / ``extract``.
            session: the session to run on.
            asynchronous: return at once, train in the background (``ASYNC``).
            **lora: ``USING LORA`` options (rank, alpha, target_modules, lr, epochs,
                dropout, batch_size, seed, holdout).

        Returns:
            The adapter's ``SHOW ADAPTERS`` row as a :class:`~llmsql.result.Result`.

        Raises:
            ConfigError: the session's backend cannot train.
            PlanError: a bad column, label, option, or a name already taken.
        """
        kinds = {"filter": CallKind.FILTER, "classify": CallKind.CLASSIFY,
                 "map": CallKind.MAP, "extract": CallKind.EXTRACT}
        kind = kinds.get(function.lower()) if isinstance(function, str) else None
        if kind is None:
            msg = (f"llm.create_adapter(): function must be one of {', '.join(kinds)}, got "
                   f"{function!r}")
            raise PlanError(msg)
        opts: list[tuple[str, object]] = []
        if labels is not None:
            opts.append(("labels", _check_labels(labels)))
        if schema is not None:
            opts.append(("schema", _schema_text(schema)))
        call = self._call(kind, instruction, fields, opts, "create_adapter")
        self._check_columns([label], "create_adapter")
        con = resolve_session(session or self._session)
        columns = column_labels(self._data, self._kind)
        table = to_arrow(self._data, self._kind, [columns[n] for n in [*fields, label]])
        return con.create_adapter(name, call.sql(dialect=LLMSQL), table, label=label,
                                  asynchronous=asynchronous, **lora)

    # -- helpers --------------------------------------------------------------------------------

    def _agg_column(self, column: str | None, keys: Sequence[str]) -> str:
        """The answer column's name: ``column``, or the first of answer, answer_1, ... unused."""
        if column is None:
            used = set(column_labels(self._data, self._kind))
            return next(name for n in itertools.count()
                        if (name := f"answer_{n}" if n else "answer") not in used)
        if not isinstance(column, str) or not column:
            msg = f"llm.agg(): 'column' must be a non-empty string, got {column!r}"
            raise PlanError(msg)
        if column in keys:
            msg = (
                f"llm.agg(): the answer column {column!r} is also a group key, so the result "
                "would have two columns of that name; pass another name with column=..."
            )
            raise PlanError(msg)
        return column

    def _check_columns(self, names: Sequence[str], op: str) -> None:
        known = column_labels(self._data, self._kind)
        for name in names:
            if not isinstance(name, str):
                msg = f"llm.{op}(): column names must be strings, got {name!r}"
                raise PlanError(msg)
            if name not in known:
                near = difflib.get_close_matches(name, list(known), n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                msg = (
                    f"llm.{op}(): unknown column {name!r}; the frame has columns "
                    f"{', '.join(map(repr, known))}{hint}"
                )
                raise PlanError(msg)

    def _call(self, kind: CallKind, instruction: str, fields: Sequence[str],
              options: Sequence[tuple[str, object]], op: str) -> LLMFunc:
        if not isinstance(instruction, str) or not instruction.strip():
            msg = (
                f"llm.{op}(): the first argument must be the instruction, a non-empty string, "
                f"e.g. df.llm.{op}('Is the review positive?', 'review')"
            )
            raise PlanError(msg)
        self._check_columns(list(fields), op)
        self._check_columns(list(placeholders(instruction)), op)
        return llm_call(kind, instruction, fields, options)

    def _needed(self, call: LLMFunc, extra: Sequence[str]) -> list[str]:
        names = [c.name for c in call.find_all(exp.Column)]
        return list(dict.fromkeys([*extra, *names]))

    def _run(self, query: exp.Select, call: LLMFunc, session: Session | None, op: str,
             extra: Sequence[str] = ()) -> pa.Table:
        """Register the needed columns, run ``query`` (given no FROM) over them, return Arrow."""
        con = resolve_session(session or self._session)
        labels = column_labels(self._data, self._kind)
        needed = self._needed(call, [*extra, *placeholders(call.expressions[0].name)])
        table = to_arrow(self._data, self._kind, [labels[n] for n in needed])
        name = f"__llmsql_frame_{next(_frame_ids)}"
        text = query.from_(exp.to_table(name)).sql(dialect=LLMSQL)
        try:
            with registered(con, {name: table}):
                return con.sql(text).arrow()
        except PlanError as exc:
            msg = f"llm.{op}(): {exc}"
            raise PlanError(msg, sql=text) from None

    def _add(self, call: LLMFunc, column: str, session: Session | None, op: str) -> Any:
        if not isinstance(column, str) or not column:
            msg = f"llm.{op}(): 'column' must be a non-empty string, got {column!r}"
            raise PlanError(msg)
        table = self._run(_per_row(call), call, session, op)
        return with_columns(self._data, self._kind, {column: table.column(OUT_COL)})


def _per_row(call: LLMFunc) -> exp.Select:
    """``SELECT call AS out ... ORDER BY row`` (no FROM yet): one answer per row, in order."""
    return exp.select(exp.alias_(call, OUT_COL, quoted=True)).order_by(_col(ROW_COL))


def _group_query(call: LLMFunc, keys: Sequence[str], *, sort: bool, dropna: bool) -> exp.Select:
    """``SELECT keys, LLM_AGG(...) ... GROUP BY keys ORDER BY ...`` (no FROM yet)."""
    query = exp.select(*[_col(k) for k in keys], exp.alias_(call, OUT_COL, quoted=True))
    if not keys:
        return query
    query = query.group_by(*[_col(k) for k in keys])
    if dropna:
        query = query.where(exp.and_(*[exp.not_(_col(k).is_(exp.null())) for k in keys]))
    if sort:
        return query.order_by(*[exp.Ordered(this=_col(k), nulls_first=False) for k in keys])
    return query.order_by(exp.Min(this=_col(ROW_COL)))


def frame(data: Any, /, *, session: Session | None = None) -> LLMFrame:
    """LLM operators over a pandas or polars DataFrame or a pyarrow Table.

    >>> import llmsql, pyarrow as pa
    >>> con = llmsql.connect(dry_run=True, progress=False)
    >>> t = pa.table({"review": ["great", "bad"]})
    >>> llmsql.frame(t, session=con).map("Summarize.", "review").column_names
    ['review', 'answer']
    >>> con.close()
    """
    return LLMFrame(data, session=session)


# ---- pandas groupby -----------------------------------------------------------------------------


class GroupByLLM:
    """``df.groupby(keys).llm``: LLM aggregation per group (column-name keys only)."""

    def __init__(self, groupby: Any) -> None:
        self._gb = groupby

    def _keys(self) -> list[str]:
        keys = self._gb.keys
        if isinstance(keys, str):
            return [keys]
        if (self._gb.level is None and isinstance(keys, (list, tuple))
                and all(isinstance(k, str) for k in keys)):
            return list(keys)
        msg = (
            "df.groupby(...).llm.agg() groups by column names only; for other groupings, "
            "add the key as a column and use df.llm.agg(..., by=['key'])"
        )
        raise UnsupportedError(msg)

    def agg(
        self, instruction: str, /, *fields: str, column: str | None = None,
        session: Session | None = None, model: str | None = None,
        max_tokens: int | None = None, temperature: float | None = None,
        seed: int | None = None, truncate: bool = False,
    ) -> pd.DataFrame:
        """One answer per group (``LLM_AGG``), honouring the groupby's sort/dropna/as_index.

        Args:
            instruction: what to answer about each group.
            *fields: columns of each row put in the group's prompt.
            column: the name of the answer column. None (the default): ``answer``, or
                ``answer_1`` (``answer_2``, ...) if the frame has a column named ``answer``,
                so it never clashes with a data column or group key (see
                :meth:`LLMFrame.agg`). A name that is a group key is a PlanError.
            session, model, max_tokens, temperature, seed, truncate: as for
                :meth:`LLMFrame.filter`.

        Returns:
            A DataFrame with one row per group.
        """
        gb = self._gb
        return LLMFrame(gb.obj).agg(
            instruction, *fields, by=self._keys(), column=column, sort=gb.sort,
            dropna=gb.dropna, as_index=gb.as_index, session=session, model=model,
            max_tokens=max_tokens, temperature=temperature, seed=seed, truncate=truncate,
        )


# ---- registration -------------------------------------------------------------------------------


def register_pandas_accessor() -> None:
    """Register ``df.llm`` and ``df.groupby(...).llm`` (imports pandas; idempotent)."""
    import pandas as pd

    if not hasattr(pd.DataFrame, "llm"):
        pd.api.extensions.register_dataframe_accessor("llm")(LLMFrame)
    from pandas.core.groupby import DataFrameGroupBy

    if not hasattr(DataFrameGroupBy, "llm"):
        DataFrameGroupBy.llm = property(GroupByLLM)


def register_polars_namespace() -> None:
    """Register ``pl_df.llm`` on polars DataFrames (imports polars; idempotent)."""
    import polars as pl

    if not hasattr(pl.DataFrame, "llm"):
        pl.api.register_dataframe_namespace("llm")(LLMFrame)


REGISTRATIONS: tuple[tuple[str, Callable[[], None]], ...] = (
    ("pandas", register_pandas_accessor),
    ("polars", register_polars_namespace),
)
"""(frame library, the function that registers its ``.llm``), run once the library is
imported."""


class _RegisterOnImport:
    """A ``sys.meta_path`` finder that runs a library's registration right after the
    library's own ``__init__`` ran, so ``import llmsql`` needs to import neither pandas
    (half a second) nor polars and ``df.llm`` still works whichever is imported first.

    It finds nothing itself: it asks the finders after it for the spec and wraps that
    spec's loader's ``exec_module`` (the module and its loader stay the library's own). It
    leaves ``sys.meta_path`` once every library it waits for was imported.
    """

    def __init__(self, hooks: Mapping[str, Callable[[], None]]) -> None:
        self._hooks = dict(hooks)

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        """The library's own spec, with the registration after its ``exec_module``."""
        hook = self._hooks.get(fullname)
        if hook is None:
            return None
        spec = self._spec_after_me(fullname, path, target)
        loader = spec.loader if spec is not None else None
        if loader is not None and hasattr(loader, "exec_module"):
            run = loader.exec_module

            def exec_module(module: ModuleType) -> None:
                run(module)
                self._hooks.pop(fullname, None)
                if not self._hooks and self in sys.meta_path:
                    sys.meta_path.remove(self)
                hook()

            loader.exec_module = exec_module  # type: ignore[method-assign]  # this instance only
        return spec

    def _spec_after_me(self, fullname: str, path: Sequence[str] | None,
                       target: ModuleType | None) -> ModuleSpec | None:
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if _is_registrar(finder) or find is None:  # another copy of this module's
                continue                                 # finder would ask this one back
            spec = find(fullname, path, target)
            if spec is not None:
                return spec  # type: ignore[no-any-return]
        return None


def _is_registrar(finder: object) -> bool:
    """Whether ``finder`` is a :class:`_RegisterOnImport`, from this module or from another
    copy of it (a module imported twice by path, as pytest's doctests do, has its own class).
    """
    return type(finder).__qualname__ == _RegisterOnImport.__qualname__ and \
        type(finder).__module__.endswith("dataframe")


def register_on_import(
    hooks: Sequence[tuple[str, Callable[[], None]]] = REGISTRATIONS, /
) -> None:
    """Run each library's registration now if it is imported already, else right after it
    is (once; see :class:`_RegisterOnImport`). ``import llmsql`` calls this.
    """
    waiting = {}
    for name, hook in hooks:
        if name in sys.modules:
            hook()
        else:
            waiting[name] = hook
    if waiting and not any(_is_registrar(f) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport(waiting))


register_on_import()
