"""llmsql: declarative batch LLM queries over relational data.

``import llmsql`` stays light: torch, transformers, vllm and pyspark are imported only
when a backend or executor that needs them is built, and neither pandas nor polars is
imported: the accessors ``df.llm`` and ``pl_df.llm`` (:mod:`llmsql.dataframe`) are
registered when the user imports them, before or after llmsql. IPython is imported only by
``%load_ext llmsql``.
"""

from __future__ import annotations

from typing import Any

from llmsql.adapters import AdapterRecord, LoraOptions
from llmsql.config import SessionConfig
from llmsql.dataframe import frame
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
from llmsql.frames import default_session, set_default_session, sql
from llmsql.session import Explain, Result, Session, connect
from llmsql.udfs.base import Volatility

__version__ = "0.1.0"


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext llmsql``: the ``%%llmsql`` magic (see :mod:`llmsql.jupyter`)."""
    from llmsql.jupyter import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext llmsql``: close the sessions the magic opened."""
    from llmsql.jupyter import unload_ipython_extension as unload

    unload(ipython)


__all__ = [
    "AdapterRecord",
    "BackendError",
    "ConfigError",
    "ContextLengthError",
    "ExecutionError",
    "Explain",
    "LLMSQLError",
    "LoraOptions",
    "OptimizerError",
    "ParseError",
    "PlanError",
    "QueryInterrupted",
    "Result",
    "Session",
    "SessionConfig",
    "UnsupportedError",
    "Volatility",
    "connect",
    "default_session",
    "frame",
    "load_ipython_extension",
    "set_default_session",
    "sql",
    "unload_ipython_extension",
]
