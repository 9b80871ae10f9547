"""The executor seam: run plain SQL, hold lookups, run the final query."""

from __future__ import annotations

from typing import Protocol

import pyarrow as pa

from llmsql.executors.llm_step import CallStats, StepEnv
from llmsql.plan import LLMCall, QueryPlan


class Executor(Protocol):
    """One engine: answers an LLM call into its lookup, runs the final query."""

    name: str

    def register(self, name: str, data: object, /) -> None:
        """Expose a DataFrame, Arrow table or file path as table ``name``."""
        ...

    def run_call(self, call: LLMCall, env: StepEnv, /) -> CallStats:
        """Compute ``call``'s inputs, answer them, and make the answers readable as
        ``call.lookup`` for later calls and the final query."""
        ...

    def final(self, plan: QueryPlan, /) -> pa.Table | None:
        """Run the final statement; None when it returns no rows (DDL)."""
        ...

    def drop_lookups(self, plan: QueryPlan, /) -> None:
        """Forget every lookup of ``plan``."""
        ...

    def close(self) -> None:
        """Release the engine's resources."""
        ...
