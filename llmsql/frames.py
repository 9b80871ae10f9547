"""Frames in and out: pandas, polars and Arrow; per-query tables; ``llmsql.sql``.

pandas and polars are imported only where a frame of theirs is converted (``import llmsql``
imports neither).

``llmsql.sql(query, name=frame, ...)`` runs SQL over frames passed by name; the DataFrame
API (:mod:`llmsql.dataframe`) uses the same helpers to hand a frame's columns to the engine
as Arrow and to give results back as the caller's kind of frame. When no session is
passed, both use the *default session* (:func:`default_session`), opened on first use with
``llmsql.connect()`` or chosen with :func:`set_default_session`: the one place a
module-level session exists, as a notebook convenience at the API edge.
"""

from __future__ import annotations

import atexit
import enum
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa

from llmsql.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

    from llmsql.session import Result, Session

ROW_COL = "__llmsql_row"
"""The row-position column added to a frame handed to the engine (results are realigned)."""


# ---- the default session ---------------------------------------------------------------------


class _DefaultSession:
    """The session the DataFrame API and ``%%llmsql`` use when they are given none."""

    def __init__(self) -> None:
        self.session: Session | None = None
        self.owned = False
        self.hooked = False

    def get(self) -> Session:
        if self.session is None:
            from llmsql.session import connect

            self.session, self.owned = connect(), True
            if not self.hooked:
                # Closed at interpreter exit: left to teardown, the DuckDB objects it holds
                # are reported as "nanobind: leaked N instances" on stderr.
                atexit.register(self.close_owned)
                self.hooked = True
        return self.session

    def set(self, session: Session | None) -> None:
        if self.session is not session:
            self.close_owned()
        self.session, self.owned = session, False

    def close_owned(self) -> None:
        """Close the session if llmsql opened it (the next :meth:`get` opens a new one)."""
        if self.owned and self.session is not None:
            self.session.close()
            self.session, self.owned = None, False


_DEFAULT = _DefaultSession()


def default_session() -> Session:
    """The session used when none is passed; ``llmsql.connect()`` on first use.

    Returns:
        The session set with :func:`set_default_session`, else one opened with the
        defaults (DuckDB, the embedded model on CPU or vLLM on a GPU).
    """
    return _DEFAULT.get()


def set_default_session(session: Session | None, /) -> None:
    """Make ``session`` the one ``df.llm``, ``llmsql.sql`` and ``%%llmsql`` use by default.

    Args:
        session: a session (the caller keeps ownership and closes it), or None to go back
            to a lazily opened default one. A default session llmsql opened itself is
            closed when replaced.
    """
    _DEFAULT.set(session)


def resolve_session(session: Session | None, /) -> Session:
    """``session`` checked, or the default session when it is None."""
    from llmsql.session import Session

    if session is None:
        return default_session()
    if not isinstance(session, Session):
        raise ConfigError(
            f"'session' must be an llmsql Session (from llmsql.connect()), got "
            f"{type(session).__name__}"
        )
    return session


# ---- frames -------------------------------------------------------------------------------------


class FrameKind(enum.Enum):
    """The frame libraries the DataFrame API accepts (results come back the same kind)."""

    PANDAS = "pandas"
    POLARS = "polars"
    ARROW = "arrow"


def frame_kind(data: Any, /) -> FrameKind:
    """The kind of ``data``.

    Raises:
        ConfigError: ``data`` is not a pandas/polars DataFrame or a pyarrow Table.
    """
    pd = sys.modules.get("pandas")  # never imported here: a frame of it means it is loaded
    if pd is not None and isinstance(data, pd.DataFrame):
        return FrameKind.PANDAS
    if isinstance(data, pa.Table):
        return FrameKind.ARROW
    cls = type(data)
    if cls.__module__.startswith("polars") and cls.__name__ == "DataFrame":
        return FrameKind.POLARS
    hint = "; call .collect() first" if cls.__name__ == "LazyFrame" else ""
    raise ConfigError(
        f"expected a pandas DataFrame, a polars DataFrame or a pyarrow Table, got "
        f"{cls.__module__}.{cls.__name__}{hint}"
    )


def column_labels(data: Any, kind: FrameKind) -> dict[str, Any]:
    """Column name (as the prompt shows it) -> the frame's own column label."""
    raw = list(data.columns) if kind is not FrameKind.ARROW else list(data.column_names)
    names = {str(c): c for c in raw}
    if len(names) != len(raw):
        dup = next(str(c) for c in raw if sum(str(d) == str(c) for d in raw) > 1)
        raise ConfigError(f"the frame has two columns named {dup!r}; rename one first")
    return names


def to_arrow(data: Any, kind: FrameKind, labels: Sequence[Any]) -> pa.Table:
    """The columns ``labels`` of ``data`` as Arrow (zero-copy for Arrow and polars)."""
    if kind is FrameKind.ARROW:
        table = data.select(list(labels))
    elif kind is FrameKind.POLARS:
        table = data.select(list(labels)).to_arrow()
    else:
        try:
            table = pa.Table.from_pandas(data[list(labels)], preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ConfigError(
                f"cannot convert the columns {[str(c) for c in labels]} to Arrow: {exc}; give "
                "each column one type, e.g. df[col].astype(str)"
            ) from None
        table = table.rename_columns([str(c) for c in labels])
    positions = pa.array(range(table.num_rows), type=pa.int64())
    return table.append_column(ROW_COL, positions)


def take(data: Any, kind: FrameKind, positions: pa.ChunkedArray) -> Any:
    """The rows of ``data`` at ``positions``, in that order."""
    if kind is FrameKind.PANDAS:
        return data.iloc[positions.to_numpy()]
    if kind is FrameKind.POLARS:
        return data[positions.to_pylist()]
    return data.take(positions)


def with_columns(data: Any, kind: FrameKind, columns: Mapping[str, pa.ChunkedArray]) -> Any:
    """``data`` plus (or with replaced) ``columns``, aligned by position."""
    if kind is FrameKind.PANDAS and columns:
        added = to_pandas(pa.table(dict(columns))).set_axis(data.index)
        return data.assign(**{name: added[name] for name in columns})
    if kind is FrameKind.POLARS:
        import polars as pl

        return data.with_columns([pl.Series(n, c) for n, c in columns.items()])
    for name, col in columns.items():
        idx = data.schema.get_field_index(name)
        data = data.set_column(idx, name, col) if idx >= 0 else data.append_column(name, col)
    return data


def to_pandas(table: pa.Table, /) -> pd.DataFrame:
    """``table`` as pandas, converted as DuckDB's own ``.df()`` converts a query's result.

    ``Result.df()`` and the DataFrame API's pandas results go through here, so
    ``Session.sql(q).df()`` equals ``duckdb.sql(q).df()`` on the same data (but for
    whole-number decimals, below), whatever the engine, under pandas 2 and 3:

    - DECIMAL becomes float64, not Python ``Decimal`` objects;
    - HUGEINT (DuckDB's type of ``SUM`` over integers, exported to Arrow as
      ``decimal128(38, 0)``) and other whole-number decimals stay integers: nullable
      ``Int64`` (Python ints past its range), where DuckDB's own ``.df()`` gives float64;
    - integer and boolean columns with NULLs become pandas' nullable ``Int64``/``boolean``
      (NULL is ``<NA>``), not float64 with NaN or objects;
    - a NULL string is pandas' own missing string: None in pandas 2's object dtype, NaN in
      pandas 3's default ``str`` dtype (as ``pd.DataFrame({"k": [None]})`` gives).

    pyarrow's ``Table.to_pandas`` differs on the first two. Column names are kept exactly
    as in the Arrow table, and time-zone-aware timestamps in the time zone of their Arrow
    type (DuckDB exports its session's ``TimeZone``). A table DuckDB cannot convert (no
    columns, or a type it cannot read, such as ``decimal256``) is converted by pyarrow.

    >>> import pyarrow as pa
    >>> to_pandas(pa.table({"n": pa.array([3, None], pa.decimal128(38, 0))}))["n"].tolist()
    [3, <NA>]
    """
    if table.num_columns == 0:
        return table.to_pandas()
    zones = _time_zones(table.schema)
    con = duckdb.connect()
    try:
        frame = con.from_arrow(_without_time_zones(table, zones)).df()
    except (duckdb.NotImplementedException, duckdb.InvalidInputException):
        return table.to_pandas()
    finally:
        con.close()
    if list(frame.columns) != table.column_names:  # DuckDB renames duplicates: id, id_1
        frame.columns = table.column_names
    for i, zone in zones.items():
        frame.isetitem(i, frame.iloc[:, i].dt.tz_localize("UTC").dt.tz_convert(zone))
    for i, field in enumerate(table.schema):
        if pa.types.is_decimal(field.type) and field.type.scale == 0:
            frame.isetitem(i, _whole_numbers(table.column(i)))
    return frame


def _whole_numbers(column: pa.ChunkedArray) -> pd.Series:
    """A scale-0 decimal column (HUGEINT sums) as integers: nullable ``Int64`` where every
    value fits, else Python ints (never float64, which loses digits past 2**53).

    >>> import pyarrow as pa
    >>> _whole_numbers(pa.chunked_array([pa.array([3, None], pa.decimal128(38, 0))])).tolist()
    [3, <NA>]
    >>> _whole_numbers(pa.chunked_array([pa.array([10**20], pa.decimal128(38, 0))])).tolist()
    [100000000000000000000]
    """
    import pandas as pd

    try:
        return column.cast(pa.int64()).to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)
    except pa.ArrowInvalid:  # beyond int64
        return pd.Series([None if v is None else int(v) for v in column.to_pylist()],
                         dtype=object)


def _time_zones(schema: pa.Schema) -> dict[int, str]:
    """Column position -> time zone, for the time-zone-aware timestamp columns."""
    return {i: f.type.tz for i, f in enumerate(schema)
            if pa.types.is_timestamp(f.type) and f.type.tz}


def _without_time_zones(table: pa.Table, zones: Mapping[int, str]) -> pa.Table:
    """``table`` with those timestamps as UTC wall times (the same values, no zone).

    DuckDB would convert them to its connection's ``TimeZone`` (a fresh connection's, not
    the session's), read nanosecond ones without their zone, and (DuckDB 2.0 under pandas
    3.1) warn about its own use of ``DataFrame.drop(inplace=True)``.
    """
    for i in zones:
        field = table.schema.field(i)
        naive = table.column(i).cast(pa.timestamp(field.type.unit))
        table = table.set_column(i, field.name, naive)
    return table


def from_arrow(table: pa.Table, kind: FrameKind) -> Any:
    """``table`` as ``kind`` of frame (pandas: as :func:`to_pandas` converts it)."""
    if kind is FrameKind.PANDAS:
        return to_pandas(table)
    if kind is FrameKind.POLARS:
        import polars as pl

        return pl.from_arrow(table)
    return table


# ---- running --------------------------------------------------------------------------------


def _unregister(session: Session, name: str) -> None:
    """Forget a table registered for one call (DuckDB: drop the temporary view)."""
    drop = getattr(session.executor, "unregister", None)
    if callable(drop):
        drop(name)
        return
    con = getattr(session.executor, "con", None)
    if con is not None:
        con.unregister(name)


@contextmanager
def registered(session: Session, tables: Mapping[str, Any], /) -> Iterator[None]:
    """Register ``tables`` in ``session`` for the duration of the block."""
    done: list[str] = []
    try:
        for name, data in tables.items():
            session.register(name, data)
            done.append(name)
        yield
    finally:
        for name in done:
            _unregister(session, name)


def temporary_views(session: Session, /) -> set[str]:
    """Lower-cased names of the session's registered frames (DuckDB temporary views)."""
    con = getattr(session.executor, "con", None)
    if con is None:
        return set()
    rows = con.sql("SELECT lower(view_name) FROM duckdb_views() WHERE temporary").fetchall()
    return {r[0] for r in rows}


def sql(query: str, /, *, session: Session | None = None, **tables: Any) -> Result:
    """Run ``query`` with DataFrames or Arrow tables passed by name as its tables.

    >>> import llmsql, pandas as pd
    >>> con = llmsql.connect(dry_run=True, progress=False)
    >>> r = llmsql.sql("SELECT id FROM t WHERE LLM_FILTER('Ok?', v)", session=con,
    ...                t=pd.DataFrame({"id": [1], "v": ["x"]}))
    >>> r.arrow().num_rows
    1

    Args:
        query: SQL with LLM functions (one or more statements).
        session: the session to run on (default: :func:`default_session`).
        **tables: pandas or polars DataFrames, pyarrow Tables or parquet/csv/json paths,
            visible to this query only under the keyword's name (Arrow and DataFrames are
            scanned in place, not copied).

    Returns:
        The last statement's :class:`~llmsql.session.Result`.

    Raises:
        ConfigError: a table name is already taken by a frame registered in the session.
    """
    con = resolve_session(session)
    taken = temporary_views(con) & {n.lower() for n in tables}
    if taken:
        raise ConfigError(
            f"table {min(taken)!r} is already registered in this session; pass the "
            "frame under another name, or query the registered one with session.sql()"
        )
    with registered(con, tables):
        return con.sql(query)
