"""The DuckDB executor (the embedded default).

Every DuckDB call that returns Arrow goes through :func:`to_arrow`, the one place that
knows DuckDB's Arrow export API (it moved across versions; see docs/STYLE.md).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
from sqlglot import exp

from llmsql.errors import ConfigError, ExecutionError, PlanError
from llmsql.step import StepEnv, run_call

if TYPE_CHECKING:
    import pyarrow as pa

    from llmsql.plan import LLMCall, QueryPlan
    from llmsql.stats import CallStats

READERS = {
    ".parquet": "read_parquet",
    ".pq": "read_parquet",
    ".csv": "read_csv_auto",
    ".tsv": "read_csv_auto",
    ".json": "read_json_auto",
    ".jsonl": "read_json_auto",
    ".ndjson": "read_json_auto",
}


def to_arrow(rel: duckdb.DuckDBPyRelation) -> pa.Table:
    """A relation's rows as one Arrow table."""
    return rel.to_arrow_table()


def _sql(node: exp.Expression) -> str:
    return node.sql(dialect="duckdb")


class DuckDBExecutor:
    """Runs plans on one DuckDB connection."""

    name = "duckdb"

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con

    @classmethod
    def create(cls, *, database: str = ":memory:", **options: Any) -> DuckDBExecutor:
        """A new connection to ``database`` (``:memory:`` or a file)."""
        if options.get("spark") is not None:
            msg = "the 'spark' setting needs engine='spark'"
            raise ConfigError(msg)
        try:
            return cls(duckdb.connect(database))
        except duckdb.Error as exc:
            msg = f"cannot open DuckDB database {database!r}: {exc}"
            raise ConfigError(msg) from None

    def close(self) -> None:
        """Close the connection."""
        self.con.close()

    # -- tables ------------------------------------------------------------------------------

    def register(self, name: str, data: Any) -> None:
        """Expose a DataFrame, Arrow table/reader or a file path as table ``name``."""
        if isinstance(data, (str, os.PathLike)):
            self._register_path(name, Path(data))
            return
        if type(data).__module__.startswith("polars"):
            data = data.to_arrow()
        try:
            self.con.register(name, data)
        except (duckdb.Error, TypeError, ValueError) as exc:
            msg = (
                f"cannot register {type(data).__name__} as table {name!r}: {exc}; pass a "
                "pandas or polars DataFrame, a pyarrow Table, or a parquet/csv/json path"
            )
            raise ConfigError(msg) from None

    def _register_path(self, name: str, path: Path) -> None:
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            msg = (
                f"table {name!r}: cannot tell the format of {str(path)!r}; use a .parquet, "
                ".csv or .json file"
            )
            raise ConfigError(msg)
        if not path.is_file():
            msg = f"table {name!r}: file {str(path)!r} does not exist"
            raise ConfigError(msg)
        if not os.access(path, os.R_OK):
            msg = f"table {name!r}: file {str(path)!r} is not readable"
            raise ConfigError(msg)
        literal = str(path).replace("'", "''")
        ident = exp.to_identifier(name).sql(dialect="duckdb")
        try:
            self.con.execute(
                f"CREATE OR REPLACE VIEW {ident} AS SELECT * FROM {reader}('{literal}')")
            self.con.sql(f"SELECT * FROM {ident} LIMIT 0").fetchall()
        except duckdb.Error as exc:
            msg = f"table {name!r}: cannot read {str(path)!r}: {exc}"
            raise ConfigError(msg) from None

    # -- the executor protocol --------------------------------------------------------------

    def inputs(self, call: LLMCall, /) -> pa.Table:
        """Rows of the call's input query."""
        try:
            return to_arrow(self.con.sql(_sql(call.input)))
        except (duckdb.BinderException, duckdb.CatalogException) as exc:
            msg = (
                f"{call.where}: {_first_line(exc)}; check the table and column names in "
                f"{call.text[:80]}"
            )
            raise PlanError(
                msg, line=call.line, col=call.col,
            ) from None
        except duckdb.Error as exc:
            msg = f"computing the inputs of {call.where} failed: {exc}"
            raise ExecutionError(
                msg, executor=self.name,
                step=call.id,
            ) from None

    def put_lookup(self, call: LLMCall, table: pa.Table, /) -> None:
        """Register the answers as a view named ``call.lookup``."""
        self.con.register(call.lookup, table)

    def run_call(self, call: LLMCall, env: StepEnv, /) -> CallStats:
        """Inputs from DuckDB, answers from the backend (in this process), lookup registered."""
        t0 = time.perf_counter()
        inputs = self.inputs(call)
        took = time.perf_counter() - t0
        lookup, stats = run_call(call, inputs, env)
        stats.input_seconds = took
        self.put_lookup(call, lookup)
        return stats

    def final(self, plan: QueryPlan, /) -> pa.Table | None:
        """Run the final statement."""
        try:
            rel = self.con.sql(_sql(plan.final))
        except (duckdb.BinderException, duckdb.CatalogException, duckdb.ParserException) as exc:
            msg = f"{_first_line(exc)}; check the query's names"
            raise PlanError(msg) from None
        except duckdb.Error as exc:
            msg = f"the query failed in DuckDB: {exc}"
            raise ExecutionError(msg, executor=self.name) from None
        return None if rel is None else to_arrow(rel)

    def drop_lookups(self, plan: QueryPlan, /) -> None:
        """Unregister the plan's lookup views."""
        for call in plan.calls:
            try:
                self.con.unregister(call.lookup)
            except duckdb.Error:
                continue


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    head, _, rest = text.partition("\n")
    return f"{head} ({rest.strip()})" if rest.strip() else head
