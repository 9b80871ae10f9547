"""A query's result and its statistics: Arrow, pandas, a Spark DataFrame or a preview.

With ``engine='duckdb'`` the result is an Arrow table from the start. With
``engine='spark'`` it stays in Spark (:class:`llmsql.executors.spark.SparkTable`: the final
query checkpointed on the executors) until Arrow, pandas, a preview or its length is asked
for, so a large result need not fit on the driver: ``Result.spark()`` hands it on as a
DataFrame.

>>> import pyarrow as pa
>>> res = Result(pa.table({"id": [1, 2, 3]}), QueryStats())
>>> len(res), res.arrow().column("id").to_pylist()
(3, [1, 2, 3])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from llmsql.convert import to_pandas
from llmsql.errors import ConfigError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from llmsql.executors.base import DeferredTable
    from llmsql.stats import CallStats


@dataclass(slots=True)
class QueryStats:
    """Per-call statistics of one query."""

    calls: list[CallStats] = field(default_factory=list)
    backend_contacted: bool | None = None
    """Whether the query reached a backend: built it (loaded a model, listed a server's
    models), sent it prompts or warm-ups, or had it count tokens. False: answered from the
    result cache alone, so it ran with the model unloaded or the server down. None: not
    tracked (a backend object given by the caller, a dry run)."""

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens the backends were sent (every LLM call and selectivity sample, as
        the responses counted them: chat template included; warm-ups not): the figure
        EXPLAIN estimates as :attr:`llmsql.session.Explain.prompt_tokens`.
        """
        return sum(c.prompt_tokens for c in self.calls)

    @property
    def null_answers(self) -> int:
        """Answers that could not be parsed (NULL in the result)."""
        return sum(c.null_answers for c in self.calls)

    @property
    def failed(self) -> int:
        """Calls that failed for good (NULL in the result)."""
        return sum(c.failed for c in self.calls)

    def summary(self) -> str:
        """One line per LLM call."""
        lines = []
        for c in self.calls:
            hit = cached_share(c)
            extra = "".join(
                f", {n} {what}" for n, what in ((c.null_answers, "unparseable -> NULL"),
                                                (c.failed, "failed -> NULL"),
                                                (c.truncated, "truncated"),
                                                (c.from_cache, "from the result cache")) if n
            )
            lines.append(
                f"{c.where}: {c.rows_in} rows, {c.distinct_prompts} distinct prompts, "
                f"{c.sent} sent, {c.prompt_tokens} prompt tokens{hit}, {c.seconds:.2f}s{extra}"
            )
        cached = sum(c.from_cache for c in self.calls)
        if self.backend_contacted is False and cached:
            lines.append(f"all {cached} answers from the result cache; backend not contacted")
        return "\n".join(lines)


def cached_share(c: CallStats) -> str:
    """``", 41% cached"``, or what is known where the backend did not report it."""
    if not c.prompt_tokens:
        return ""
    if c.cached_unknown:
        return ", cached tokens not reported by the backend"
    share = f", {100 * c.cached_tokens / c.prompt_tokens:.0f}% cached"
    return share + (f" ({c.cache_unreported} prompts unreported)" if c.cache_unreported else "")


class Result:
    """A query's result: Arrow, pandas, a Spark DataFrame or a printed preview, plus stats."""

    def __init__(self, table: pa.Table | DeferredTable, stats: QueryStats) -> None:
        """Wrap an Arrow table, or a result an engine keeps until it is read."""
        self._table = table if isinstance(table, pa.Table) else None
        self._deferred = None if isinstance(table, pa.Table) else table
        self.stats = stats

    def arrow(self) -> pa.Table:
        """The result as a pyarrow Table (on Spark: collected to the driver on first use)."""
        if self._table is None:
            assert self._deferred is not None
            self._table = self._deferred.to_arrow()
        return self._table

    def df(self) -> Any:
        """The result as a pandas DataFrame, typed as DuckDB's own ``.df()`` types it.

        E.g. ``SUM`` over integers (HUGEINT) stays an integer (nullable ``Int64``, where
        DuckDB's own ``.df()`` gives float64) and a NULL string is pandas' missing
        string (None in pandas 2, NaN in pandas 3's ``str`` dtype); see
        :func:`llmsql.convert.to_pandas`.
        """
        return to_pandas(self.arrow())

    def spark(self, session: SparkSession | None = None, /) -> DataFrame:
        """The result as a Spark DataFrame, for further work in Spark.

        With ``engine='spark'`` this is the query's own result, kept on the executors: it
        stays valid after the query and later queries, never re-runs an LLM call, and is not
        collected to the driver. With ``engine='duckdb'`` the Arrow result is handed to
        ``session`` (default: the active SparkSession).

        Args:
            session: The SparkSession to create the DataFrame in (None: the query's own on
                Spark, else the active one).

        Returns:
            A pyspark (classic or Connect) DataFrame.

        Raises:
            ConfigError: pyspark is not installed, or no SparkSession is given or active.
        """
        frame = self._deferred.frame() if self._deferred is not None else None
        if frame is not None and (session is None or session is frame.sparkSession):
            return frame
        return _to_spark(self.arrow(), session)

    def preview(self, max_rows: int = 20) -> str:
        """A boxed text table of the first ``max_rows`` rows (only those are collected)."""
        import duckdb

        head = self._table.slice(0, max_rows) if self._table is not None else \
            self._head(max_rows)
        con = duckdb.connect()
        try:
            text = _boxed(con.from_arrow(head), max_rows)
        finally:
            con.close()
        more = len(self) - max_rows
        return text + (f"({more} more rows)\n" if more > 0 else "")

    def _head(self, n: int) -> pa.Table:
        assert self._deferred is not None
        return self._deferred.head(n)

    def show(self, max_rows: int = 20) -> None:
        """Print a preview."""
        print(self.preview(max_rows), end="")

    def __len__(self) -> int:
        if self._table is not None:
            return int(self._table.num_rows)
        assert self._deferred is not None
        return self._deferred.num_rows()

    def __repr__(self) -> str:
        return self.preview()


def _boxed(rel: Any, max_rows: int) -> str:
    """DuckDB's boxed rendering of ``rel`` showing up to ``max_rows`` rows (``str(rel)``
    stops at DuckDB's own default of 20, whatever the caller asked for).
    """
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rel.show(max_rows=max(1, max_rows))
    text = buf.getvalue()
    return text[:-1] if text.endswith("\n\n") else text  # show() prints one more newline


def _to_spark(table: pa.Table, session: SparkSession | None) -> DataFrame:
    """``table`` as a DataFrame of ``session`` (None: the active SparkSession)."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        msg = "Result.spark() needs pyspark: pip install 'llmsql[spark]'"
        raise ConfigError(msg) from None
    spark = session if session is not None else SparkSession.getActiveSession()
    if spark is None:
        msg = (
            "Result.spark(): there is no active SparkSession; pass one, as in "
            "result.spark(spark), or run the query with llmsql.connect(engine='spark')"
        )
        raise ConfigError(
            msg)
    if table.num_columns == 0:
        from pyspark.sql.types import StructType

        return spark.createDataFrame([], StructType([]))
    frame: DataFrame = spark.createDataFrame(table)
    return frame


__all__ = ["QueryStats", "Result"]
