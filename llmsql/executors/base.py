"""The executor seam: run plain SQL, hold lookups, run the final query."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import pyarrow as pa

    from llmsql.plan import LLMCall, QueryPlan
    from llmsql.stats import CallStats
    from llmsql.step import StepEnv


class DeferredTable(Protocol):
    """A query result the engine keeps until it is read (Spark: a checkpointed DataFrame)."""

    def to_arrow(self) -> pa.Table:
        """The whole result, collected (once)."""
        ...

    def head(self, n: int, /) -> pa.Table:
        """The first ``n`` rows."""
        ...

    def num_rows(self) -> int:
        """How many rows the result has."""
        ...

    def frame(self) -> Any:
        """The result as the engine's own DataFrame."""
        ...


class Executor(Protocol):
    """One engine: answers an LLM call into its lookup, runs the final query."""

    name: str

    def register(self, name: str, data: object, /) -> None:
        """Expose a DataFrame, Arrow table or file path as table ``name``."""
        ...

    def run_call(self, call: LLMCall, env: StepEnv, /) -> CallStats:
        """Compute ``call``'s inputs, answer them, and make the answers readable as
        ``call.lookup`` for later calls and the final query.
        """
        ...

    def final(self, plan: QueryPlan, /) -> pa.Table | DeferredTable | None:
        """Run the final statement; None when it returns no rows (DDL).

        Errors of the statement are raised here, and the result must not depend on the
        plan's lookups, which the caller drops next.
        """
        ...

    def drop_lookups(self, plan: QueryPlan, /) -> None:
        """Forget every lookup of ``plan``."""
        ...

    def close(self) -> None:
        """Release the engine's resources."""
        ...
