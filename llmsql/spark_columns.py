"""LLM functions as Spark column expressions (the DataFrame API).

Usage::

    from llmsql.spark_columns import llm, llm_filter, llm_score, llm_agg

    df.select("id", llm("Summarize.", "review", max_tokens=32).alias("summary"))
    df.filter(llm_filter("Does the review recommend the movie?", "synopsis", "review"))
    df.select("id", llm_score("Is the review positive?", "review").alias("p"))
    df.groupBy("movie").agg(llm_agg("What do critics say?", "review"))

Each function is planned by llmsql's planner exactly like the SQL function of the same name
(same validation, prompt rendering, constrained answers and parsing), then runs as an Arrow
UDF on the executors: every Arrow batch (``spark.sql.execution.arrow.maxRecordsPerBatch``
rows) goes through the optimizer's rules (each distinct input once, prompts ordered for
prefix reuse, batching) and is answered by the executor's long-lived inference worker (see
:mod:`llmsql.executors.spark.worker`), so the model loads once per executor.

Planning is per batch, and Spark decides the row layout. For whole-table planning -- cheap
predicates before LLM filters, one answer per distinct input across the table,
prefix-affinity partitioning balanced by tokens -- register the DataFrame in a session
(``llmsql.connect(engine="spark", spark=spark).register("t", df)``) and use SQL.

Field names in the prompt are the column names (pass names, or columns whose string form is
the name you want: ``df.review`` renders as ``review``). Rows of an ``llm_agg`` group reach
the prompt sorted by their rendered text, whatever order Spark delivers them in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa  # noqa: TC002 - pyspark's arrow_udf reads the UDFs' 'pa.Array' annotations at runtime
from sqlglot import exp

from llmsql.adapters.catalog import AdapterCatalog, default_folder
from llmsql.backends import BackendSpec, default_backend_kind
from llmsql.cache import model_key
from llmsql.dialect import LLMSQL
from llmsql.errors import ConfigError, PlanError
from llmsql.executors.spark.adapters import ShippedAdapter, ship_adapters
from llmsql.executors.spark.layout import is_connect
from llmsql.executors.spark.worker import ColumnTask, answer_column, answer_group
from llmsql.optimizer import RuleContext
from llmsql.parse import parse
from llmsql.planner import plan_query
from llmsql.step.adapter_runs import resolve_ref
from llmsql.udfs.base import Volatility

if TYPE_CHECKING:
    import os

    from pyspark.sql import Column

    from llmsql.plan import LLMCall

__all__ = ["llm", "llm_agg", "llm_classify", "llm_extract", "llm_filter", "llm_score"]



def _column_name(c: Any) -> str:
    """The prompt name of a field: a column name, or a column's Spark string form."""
    if isinstance(c, str):
        return c
    jc = getattr(c, "_jc", None) if not is_connect(c) else None
    if jc is not None:
        return str(jc.toString())
    text = str(c)  # a Connect column: Column<'name'>
    return text[8:-2] if text.startswith("Column<'") and text.endswith("'>") else text


def _literal(value: Any) -> exp.Expression:
    if isinstance(value, bool):
        return exp.Boolean(this=value)
    if isinstance(value, (int, float)):
        return exp.Literal.number(value)
    if isinstance(value, str):
        return exp.Literal.string(value)
    if isinstance(value, Sequence):
        return exp.Array(expressions=[_literal(v) for v in value])
    msg = (f"an LLM option value must be a string, number, boolean or list of strings, got "
           f"{type(value).__name__}")
    raise ConfigError(msg)


def plan_column_call(function: str, instruction: str, names: Sequence[str],
                     options: Mapping[str, Any]) -> LLMCall:
    """Plan ``FUNCTION(instruction, field..., option => value...)`` as the SQL planner does.

    >>> plan_column_call("LLM_FILTER", "Good?", ["review"], {"max_tokens": 2}).kind.value
    'LLM_FILTER'
    """
    if not names:
        msg = f"{function} in the DataFrame API needs at least one field column"
        raise PlanError(msg)
    args = [exp.Literal.string(instruction).sql(dialect=LLMSQL)]
    args += [exp.column(n, quoted=True).sql(dialect=LLMSQL) for n in names]
    args += [f"{k} => {_literal(v).sql(dialect=LLMSQL)}" for k, v in options.items()
             if v is not None]
    sql = f"SELECT {function}({', '.join(args)}) FROM __llmsql_df"
    return plan_query(sql, parse(sql)[0], query_id="df").calls[0]


def _spec(backend: str | BackendSpec | None, model: str | None,
          backend_options: Mapping[str, Any] | None) -> BackendSpec:
    if isinstance(backend, BackendSpec):
        return backend
    return BackendSpec.make(backend or default_backend_kind(), model, **dict(backend_options or {}))


def _time_zone() -> str:
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    return str(active.conf.get("spark.sql.session.timeZone", "UTC")) if active else "UTC"


def _udf(function: str, instruction: str, fields: Sequence[Any], options: dict[str, Any],
         settings: dict[str, Any]) -> Column:
    from pyspark.sql.functions import arrow_udf  # type: ignore[attr-defined]
    from pyspark.sql.pandas.types import from_arrow_type

    from llmsql.step import result_type

    call = plan_column_call(function, instruction, [_column_name(f) for f in fields], options)
    spec = _spec(settings["backend"], options.get("model"), settings["backend_options"])
    ctx = RuleContext(batch_size=settings["batch_size"] or RuleContext().batch_size,
                      reorder=settings["optimize"], warm=settings["optimize"])
    task = ColumnTask(call, spec, ctx, _time_zone(), result_type(call),
                      adapters=_adapters(call, spec, settings["adapters"]))
    # Spark infers the UDF kind from the type hints: arrays to an array is a scalar UDF,
    # arrays to a Python value a grouped aggregate.
    if call.kind.spec.aggregate:
        def body(*arrays: pa.Array) -> Any:
            return answer_group(task, arrays)
    else:
        def body(*arrays: pa.Array) -> pa.Array:
            return answer_column(task, arrays)
    body.__name__ = body.__qualname__ = function.lower()
    udf = arrow_udf(body, from_arrow_type(result_type(call)))
    if call.volatility is Volatility.VOLATILE:
        udf = udf.asNondeterministic()
    cols = [f if not isinstance(f, str) else _col(f) for f in fields]
    column: Column = udf(*cols)
    return column


def _col(name: str) -> Column:
    from pyspark.sql import functions as F

    return F.col(f"`{name}`") if not name.startswith("`") else F.col(name)


def _settings(backend: str | BackendSpec | None, backend_options: Mapping[str, Any] | None,
              batch_size: int | None, optimize: bool,
              adapters: str | os.PathLike[str] | None) -> dict[str, Any]:
    return {"backend": backend, "backend_options": backend_options, "batch_size": batch_size,
            "optimize": optimize, "adapters": adapters}


def _adapters(call: LLMCall, spec: BackendSpec,
              folder: str | os.PathLike[str] | None) -> tuple[ShippedAdapter, ...]:
    """The files of the adapter ``call`` names (none: ``()``), read from the catalog in
    ``folder`` (default: the user data folder, as a ``:memory:`` session's) and checked as a
    session checks them: ready, and trained for the model ``spec`` names.
    """
    if call.options.adapter is None:
        return ()
    catalog = AdapterCatalog(folder if folder is not None else default_folder(None))
    ref = resolve_ref(catalog, call, identity=model_key(spec) or "")
    return ship_adapters([ref])


def llm(instruction: str, /, *fields: str | Column, model: str | None = None,
        max_tokens: int | None = None, temperature: float = 0.0, seed: int | None = None,
        truncate: bool = False, adapter: str | None = None,
        adapters: str | os.PathLike[str] | None = None,
        backend: str | BackendSpec | None = None,
        backend_options: Mapping[str, Any] | None = None, batch_size: int | None = None,
        optimize: bool = True) -> Column:
    """``LLM(instruction, field, ...)`` as a column: free text per row.

    Args:
        instruction: The instruction (``{column}`` placeholders render inline).
        *fields: The prompt fields: column names or columns.
        model: A local model folder (None: the embedded model).
        max_tokens: Answer length cap.
        temperature: Sampling temperature (0: greedy, reproducible).
        seed: Sampling seed.
        truncate: Truncate the longest field when a prompt exceeds the context.
        backend: Backend kind (``transformers``, ``vllm``...) or a full
            :class:`~llmsql.backends.base.BackendSpec` (default: as ``llmsql.connect``).
        backend_options: Backend settings when ``backend`` is a kind, e.g. ``{"threads": 1}``.
        batch_size: Prompts handed to the worker at a time.
        optimize: Reorder rows and fields inside each batch for prefix reuse.
        adapter: A LoRA adapter of the catalog to answer with (``CREATE ADAPTER``); it
            must be ready and trained for this model. Its files travel with the tasks.
        adapters: The adapter catalog's folder (default: the user data folder, as for a
            session on ``:memory:``; pass ``connect(adapters=...)``'s folder).

    Raises:
        PlanError: a bad option or no field, as the SQL function would raise.
    """
    opts = {"model": model, "max_tokens": max_tokens, "temperature": temperature,
            "seed": seed, "truncate": truncate or None,
            "adapter": adapter}
    return _udf("LLM", instruction, fields, opts,
                _settings(backend, backend_options, batch_size, optimize, adapters))


def llm_filter(instruction: str, /, *fields: str | Column, model: str | None = None,
               max_tokens: int | None = None, temperature: float = 0.0,
               seed: int | None = None, truncate: bool = False,
               adapter: str | None = None,
        adapters: str | os.PathLike[str] | None = None,
        backend: str | BackendSpec | None = None,
               backend_options: Mapping[str, Any] | None = None,
               batch_size: int | None = None, optimize: bool = True) -> Column:
    """``LLM_FILTER(instruction, field, ...)`` as a boolean column (NULL when unparseable).

    Arguments as for :func:`llm`.
    """
    opts = {"model": model, "max_tokens": max_tokens, "temperature": temperature,
            "seed": seed, "truncate": truncate or None,
            "adapter": adapter}
    return _udf("LLM_FILTER", instruction, fields, opts,
                _settings(backend, backend_options, batch_size, optimize, adapters))


def llm_classify(instruction: str, /, *fields: str | Column, labels: Sequence[str],
                 model: str | None = None, max_tokens: int | None = None,
                 temperature: float = 0.0, seed: int | None = None, truncate: bool = False,
                 adapter: str | None = None,
        adapters: str | os.PathLike[str] | None = None,
        backend: str | BackendSpec | None = None,
                 backend_options: Mapping[str, Any] | None = None,
                 batch_size: int | None = None, optimize: bool = True) -> Column:
    """``LLM_CLASSIFY(instruction, labels => [...], field, ...)``: one of ``labels`` per row.

    Arguments as for :func:`llm`, plus ``labels``.
    """
    opts = {"labels": list(labels), "model": model, "max_tokens": max_tokens,
            "temperature": temperature, "seed": seed, "truncate": truncate or None,
            "adapter": adapter}
    return _udf("LLM_CLASSIFY", instruction, fields, opts,
                _settings(backend, backend_options, batch_size, optimize, adapters))


def llm_extract(instruction: str, /, *fields: str | Column, schema: str,
                model: str | None = None, max_tokens: int | None = None,
                temperature: float = 0.0, seed: int | None = None, truncate: bool = False,
                adapter: str | None = None,
        adapters: str | os.PathLike[str] | None = None,
        backend: str | BackendSpec | None = None,
                backend_options: Mapping[str, Any] | None = None,
                batch_size: int | None = None, optimize: bool = True) -> Column:
    """``LLM_EXTRACT(instruction, schema => 'name TYPE, ...', field, ...)``: a struct per row.

    Arguments as for :func:`llm`, plus ``schema``.
    """
    opts = {"schema": schema, "model": model, "max_tokens": max_tokens,
            "temperature": temperature, "seed": seed, "truncate": truncate or None,
            "adapter": adapter}
    return _udf("LLM_EXTRACT", instruction, fields, opts,
                _settings(backend, backend_options, batch_size, optimize, adapters))


def llm_score(instruction: str, /, *fields: str | Column, model: str | None = None,
              max_tokens: int | None = None, temperature: float = 0.0,
              seed: int | None = None, truncate: bool = False,
              adapter: str | None = None,
        adapters: str | os.PathLike[str] | None = None,
        backend: str | BackendSpec | None = None,
              backend_options: Mapping[str, Any] | None = None,
              batch_size: int | None = None, optimize: bool = True) -> Column:
    """``LLM_SCORE(instruction, field, ...)`` as a double column in [0, 1]: P(Yes) where the
    backend gives probabilities, else the number the model answered (NULL when none).

    Arguments as for :func:`llm`.
    """
    opts = {"model": model, "max_tokens": max_tokens, "temperature": temperature,
            "seed": seed, "truncate": truncate or None,
            "adapter": adapter}
    return _udf("LLM_SCORE", instruction, fields, opts,
                _settings(backend, backend_options, batch_size, optimize, adapters))


def llm_agg(instruction: str, /, *fields: str | Column, model: str | None = None,
            max_tokens: int | None = None, temperature: float = 0.0, seed: int | None = None,
            truncate: bool = False, adapter: str | None = None,
        adapters: str | os.PathLike[str] | None = None,
        backend: str | BackendSpec | None = None,
            backend_options: Mapping[str, Any] | None = None, batch_size: int | None = None,
            optimize: bool = True) -> Column:
    """``LLM_AGG(instruction, field, ...)`` as an aggregate: one answer per group.

    Use it in ``groupBy(...).agg(...)``; map-reduce over chunks when a group exceeds the
    context. Arguments as for :func:`llm`.
    """
    opts = {"model": model, "max_tokens": max_tokens, "temperature": temperature,
            "seed": seed, "truncate": truncate or None,
            "adapter": adapter}
    return _udf("LLM_AGG", instruction, fields, opts,
                _settings(backend, backend_options, batch_size, optimize, adapters))
