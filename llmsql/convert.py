"""Frames <-> Arrow: pandas, polars and pyarrow tables converted as DuckDB converts them.

Pure conversions with no session: :mod:`llmsql.frames` (``llmsql.sql`` over frames), the
DataFrame API and ``Result.df()`` all go through here. pandas and polars are imported only
where a frame of theirs is converted.
"""

from __future__ import annotations

import enum
import sys
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa

from llmsql.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    import pandas as pd

ROW_COL = "__llmsql_row"
"""The row-position column added to a frame handed to the engine (results are realigned)."""


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
    msg = (
        f"expected a pandas DataFrame, a polars DataFrame or a pyarrow Table, got "
        f"{cls.__module__}.{cls.__name__}{hint}"
    )
    raise ConfigError(msg)


def column_labels(data: Any, kind: FrameKind) -> dict[str, Any]:
    """Column name (as the prompt shows it) -> the frame's own column label."""
    raw = list(data.columns) if kind is not FrameKind.ARROW else list(data.column_names)
    names = {str(c): c for c in raw}
    if len(names) != len(raw):
        dup = next(str(c) for c in raw if sum(str(d) == str(c) for d in raw) > 1)
        msg = f"the frame has two columns named {dup!r}; rename one first"
        raise ConfigError(msg)
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
            msg = (
                f"cannot convert the columns {[str(c) for c in labels]} to Arrow: {exc}; give "
                "each column one type, e.g. df[col].astype(str)"
            )
            raise ConfigError(msg) from None
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
