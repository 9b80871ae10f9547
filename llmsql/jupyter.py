"""Jupyter integration: ``%load_ext llmsql``, then ``%%llmsql`` cells.

::

    %%llmsql [-o VAR] [-s SESSION | -b BACKEND -m MODEL | --dry-run]
             [--explain | --analyze] [--arrow] [--stats]
    SELECT id, LLM('Summarize.', review) AS gist FROM reviews

The cell's SQL runs on a session: ``-s NAME`` names a :class:`~llmsql.session.Session`
variable; ``-b``/``-m``/``--dry-run`` open one with those settings (kept for later cells);
otherwise the default session (``llmsql.set_default_session``) is used, the one the
DataFrame accessor uses too. pandas and polars DataFrames and pyarrow Tables of the
notebook that the query names as tables are visible to it (as ``llmsql.sql(query,
name=frame)`` would make them), unless the session already has a table of that name.

The result shows as a table (a pandas DataFrame; ``--arrow``: a pyarrow Table) and is stored
in ``VAR`` with ``-o``. ``--explain`` shows the plan and cost figures as HTML without
loading a model; ``--analyze`` runs the query and shows the measured figures and where the
time went. ``%llmsql SQL`` (line magic) runs one line of SQL with the defaults. While a
query runs, a progress bar shows prompts done, tokens/s, prefix-cache hits and the ETA.
"""

# IPython's magic decorators and display() are untyped:
# mypy: disable-error-code="no-untyped-call,untyped-decorator"
from __future__ import annotations

import atexit
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display
from sqlglot import exp

from llmsql.convert import frame_kind
from llmsql.errors import LLMSQLError, QueryInterrupted
from llmsql.explain_html import ExplainReport, explain_report
from llmsql.frames import registered, resolve_session
from llmsql.parse import parse
from llmsql.session import Result, Session, connect


def frames_in_query(query: str, namespace: dict[str, Any], /) -> dict[str, Any]:
    """The notebook frames (pandas, polars, Arrow) that ``query`` names as tables.

    >>> import pandas as pd
    >>> sorted(frames_in_query("SELECT * FROM a JOIN b USING (x)", {"a": pd.DataFrame(),
    ...                                                             "b": 1}))
    ['a']
    """
    found: dict[str, Any] = {}
    for tree in parse(query):
        for table in tree.find_all(exp.Table):
            name = table.name
            if table.args.get("db") or name not in namespace or name in found:
                continue
            try:
                frame_kind(namespace[name])
            except LLMSQLError:
                continue
            found[name] = namespace[name]
    return found


@magics_class
class LLMSQLMagics(Magics):
    """The ``%%llmsql`` cell magic and ``%llmsql`` line magic."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.sessions: dict[tuple[str | None, str | None, bool], Session] = {}
        """Sessions opened for ``-b``/``-m``/``--dry-run``, closed on unload."""

    @property
    def user_ns(self) -> dict[str, Any]:
        """The notebook's variables."""
        assert self.shell is not None  # magics are only ever registered on a shell
        ns: dict[str, Any] = self.shell.user_ns
        return ns

    @magic_arguments()
    @argument("-o", "--out", metavar="VAR", help="store the result in this variable")
    @argument("-s", "--session", metavar="NAME", help="run on the Session in this variable")
    @argument("-b", "--backend", help="backend: transformers, vllm or openai")
    @argument("-m", "--model", help="model: a local Hugging Face folder (default: embedded)")
    @argument("--dry-run", action="store_true", help="fixed valid answers; no model is loaded")
    @argument("--explain", action="store_true", help="show the plan and cost as HTML; no model")
    @argument("--analyze", action="store_true", help="run, then show measured EXPLAIN figures")
    @argument("--arrow", action="store_true", help="return a pyarrow Table, not pandas")
    @argument("--stats", action="store_true", help="print per-call statistics after the run")
    @line_cell_magic
    def llmsql(self, line: str, cell: str | None = None) -> Any:
        """Run SQL with LLM functions; see :mod:`llmsql.jupyter` for the options."""
        if cell is None:
            return self._run(line, parse_argstring(self.llmsql, ""))
        return self._run(cell, parse_argstring(self.llmsql, line))

    def _run(self, query: str, args: Any) -> Any:
        if not query.strip():
            msg = "%%llmsql: the cell has no SQL; write a query below the magic line"
            raise UsageError(msg)
        if args.explain and args.analyze:
            msg = "%%llmsql: use either --explain or --analyze, not both"
            raise UsageError(msg)
        session = self._session(args)
        try:
            return self._execute(session, query, args)
        except QueryInterrupted:
            raise
        except LLMSQLError as exc:
            msg = f"{type(exc).__name__}: {exc}"
            raise UsageError(msg) from exc

    def _execute(self, session: Session, query: str, args: Any) -> Any:
        known = session_tables(session)
        frames = {k: v for k, v in frames_in_query(query, self.user_ns).items()
                  if k.lower() not in known}
        with registered(session, frames):
            if args.explain or args.analyze:
                rep = explain_report(session, query, analyze=args.analyze)
                return self._deliver_report(rep, args)
            return self._deliver(session.sql(query), args)

    def _deliver(self, result: Result, args: Any) -> Any:
        value = result.arrow() if args.arrow else result.df()
        if args.out:
            self.user_ns[args.out] = value
        if args.stats and result.stats.calls:
            print(result.stats.summary())
        return value

    def _deliver_report(self, rep: ExplainReport, args: Any) -> ExplainReport:
        if rep.result is not None:
            value = self._deliver(rep.result, args)
            display(value)
        return rep

    def _session(self, args: Any) -> Session:
        if args.session:
            if args.backend or args.model or args.dry_run:
                msg = (
                    "%%llmsql: -s/--session cannot be combined with -b, -m or "
                    "--dry-run (the session has its own settings)"
                )
                raise UsageError(msg)
            value = self.user_ns.get(args.session)
            if not isinstance(value, Session):
                msg = (
                    f"%%llmsql: {args.session!r} is not a Session variable; create "
                    f"one with {args.session} = llmsql.connect(...)"
                )
                raise UsageError(msg)
            return value
        if not (args.backend or args.model or args.dry_run):
            return resolve_session(None)
        key = (args.backend, args.model, bool(args.dry_run))
        if key not in self.sessions:
            try:
                self.sessions[key] = connect(backend=args.backend, model=args.model,
                                             dry_run=args.dry_run)
            except LLMSQLError as exc:
                msg = f"{type(exc).__name__}: {exc}"
                raise UsageError(msg) from exc
        return self.sessions[key]

    def close(self) -> None:
        """Close the sessions this magic opened."""
        for session in self.sessions.values():
            session.close()
        self.sessions.clear()


def session_tables(session: Session, /) -> set[str]:
    """Lower-cased names of the session's tables and views, registered frames included."""
    con = getattr(session.executor, "con", None)
    if con is None:
        return set()
    rows = con.sql("SELECT lower(table_name) FROM information_schema.tables").fetchall()
    return {r[0] for r in rows}


def load_ipython_extension(ipython: Any) -> None:
    """Register the magics with ``ipython`` (``%load_ext llmsql``).

    The sessions they open are closed on ``%unload_ext llmsql`` or at interpreter exit (left
    to teardown, their DuckDB objects are reported as "nanobind: leaked N instances").
    """
    magics = LLMSQLMagics(ipython)
    ipython.register_magics(magics)
    atexit.register(magics.close)


def unload_ipython_extension(ipython: Any) -> None:
    """Close the sessions the magics opened (``%unload_ext llmsql``)."""
    magics = ipython.magics_manager.registry.get(LLMSQLMagics.__name__)
    if isinstance(magics, LLMSQLMagics):
        magics.close()
        atexit.unregister(magics.close)
