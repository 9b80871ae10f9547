"""llmsql: declarative batch LLM queries over relational data.

``import llmsql`` stays light: torch, transformers, vllm and pyspark are imported only
when a backend or executor that needs them is built.
"""

from __future__ import annotations

from llmsql.errors import (
    BackendError,
    ConfigError,
    ContextLengthError,
    ExecutionError,
    LLMSQLError,
    OptimizerError,
    ParseError,
    PlanError,
    QueryInterrupted,
    UnsupportedError,
)
from llmsql.session import Explain, Result, Session, connect
from llmsql.udfs.base import Volatility

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "ConfigError",
    "ContextLengthError",
    "ExecutionError",
    "Explain",
    "LLMSQLError",
    "OptimizerError",
    "ParseError",
    "PlanError",
    "QueryInterrupted",
    "Result",
    "Session",
    "UnsupportedError",
    "Volatility",
    "connect",
]
