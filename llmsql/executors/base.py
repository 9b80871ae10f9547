"""The executor seam: run plain SQL, hold lookups, run the final query."""

from __future__ import annotations

from typing import Protocol

import pyarrow as pa

from llmsql.plan import LLMCall, QueryPlan


class Executor(Protocol):
    """One engine: computes an LLM call's inputs, stores its answers, runs the final query."""

    name: str

    def inputs(self, call: LLMCall, /) -> pa.Table:
        """Rows of ``call.input`` (distinct inputs, or all rows for LLM_AGG)."""
        ...

    def put_lookup(self, call: LLMCall, table: pa.Table, /) -> None:
        """Make ``table`` readable as ``call.lookup``."""
        ...

    def final(self, plan: QueryPlan, /) -> pa.Table | None:
        """Run the final statement; None when it returns no rows (DDL)."""
        ...

    def drop_lookups(self, plan: QueryPlan, /) -> None:
        """Forget every lookup of ``plan``."""
        ...
