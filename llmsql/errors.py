"""The whole llmsql error hierarchy.

Every error llmsql raises on purpose derives from :class:`LLMSQLError`. Messages follow
*what happened -> where -> how to fix*. Subclasses also derive from the matching builtin
so that ``except ValueError`` keeps working for callers who do not know llmsql.
"""

from __future__ import annotations


class LLMSQLError(Exception):
    """Root of every error llmsql raises on purpose."""


class ParseError(LLMSQLError, ValueError):
    """The SQL text could not be parsed, or uses an LLM function wrongly."""

    def __init__(
        self, message: str, *, sql: str = "", line: int | None = None, col: int | None = None
    ) -> None:
        where = f" (line {line}, column {col})" if line is not None else ""
        super().__init__(f"{message}{where}")
        self.sql, self.line, self.col = sql, line, col


class PlanError(LLMSQLError, ValueError):
    """The query parsed but cannot be planned: unknown column, bad option, bad labels..."""

    def __init__(
        self, message: str, *, sql: str = "", line: int | None = None, col: int | None = None
    ) -> None:
        where = f" (line {line}, column {col})" if line is not None else ""
        super().__init__(f"{message}{where}")
        self.sql, self.line, self.col = sql, line, col


class ConfigError(LLMSQLError, ValueError):
    """A setting, model path, backend name or table file is wrong."""


class OptimizerError(LLMSQLError):
    """An optimizer rule failed unexpectedly (a bug in llmsql: please report it)."""

    def __init__(self, message: str, *, rule: str) -> None:
        super().__init__(f"optimizer rule {rule!r} failed: {message}")
        self.rule = rule


class BackendError(LLMSQLError, RuntimeError):
    """Loading a model or generating with it failed."""

    def __init__(self, message: str, *, backend: str = "") -> None:
        super().__init__(message)
        self.backend = backend


class ExecutionError(LLMSQLError, RuntimeError):
    """The engine failed while running a planned query."""

    def __init__(self, message: str, *, executor: str = "", step: str = "") -> None:
        super().__init__(message)
        self.executor, self.step = executor, step


class ContextLengthError(ExecutionError):
    """A prompt does not fit the model's context window."""


class QueryInterrupted(LLMSQLError, KeyboardInterrupt):
    """The user interrupted a running query (Ctrl-C)."""


class UnsupportedError(LLMSQLError, NotImplementedError):
    """The request is valid SQL but llmsql does not support it (yet)."""


class CallFailed(ExecutionError):
    """A prompt failed for good under ``SET llmsql.on_error = 'fail'``."""


class BudgetExceeded(LLMSQLError, RuntimeError):
    """A query reached one of its budgets (``llmsql.max_calls``...) and stopped.

    ``budget`` names it; ``limit`` and ``used`` are in its unit (calls, tokens or dollars).
    Finished work is kept in the result cache: raise the budget and run again to continue.
    """

    def __init__(self, message: str, *, budget: str, limit: float, used: float) -> None:
        super().__init__(message)
        self.budget, self.limit, self.used = budget, limit, used
