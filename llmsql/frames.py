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
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from llmsql.errors import ConfigError

if TYPE_CHECKING:

    from collections.abc import Iterator, Mapping

    from llmsql.session import Result, Session



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
        msg = (
            f"'session' must be an llmsql Session (from llmsql.connect()), got "
            f"{type(session).__name__}"
        )
        raise ConfigError(msg)
    return session


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
        msg = (
            f"table {min(taken)!r} is already registered in this session; pass the "
            "frame under another name, or query the registered one with session.sql()"
        )
        raise ConfigError(msg)
    with registered(con, tables):
        return con.sql(query)
