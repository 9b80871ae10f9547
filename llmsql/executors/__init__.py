"""Executors registry: the engine that runs the relational parts of a plan.

``duckdb`` (embedded, the default) and ``spark`` (pyspark, imported only when chosen).
"""

from __future__ import annotations

import importlib
from typing import Any

from llmsql.errors import ConfigError
from llmsql.executors.base import Executor

EXECUTORS: dict[str, str] = {
    "duckdb": "llmsql.executors.duckdb.executor:DuckDBExecutor",
    "spark": "llmsql.executors.spark.executor:SparkExecutor",
}


def make_executor(engine: str, /, **options: Any) -> Executor:
    """Build the executor named ``engine`` with its options (``database``, ``spark``...).

    Raises:
        ConfigError: unknown engine.
    """
    target = EXECUTORS.get(engine)
    if target is None:
        msg = f"unknown engine {engine!r}; choose one of: {', '.join(EXECUTORS)}"
        raise ConfigError(msg)
    module_name, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    executor: Executor = cls.create(**options)
    return executor


__all__ = ["EXECUTORS", "Executor", "make_executor"]
