"""The LLM step every engine shares: input rows in, a lookup table of answers out.

The executors (:mod:`llmsql.executors`) decide where a call's inputs come from and where its
answers go; this package binds the inputs to the call's prompt, lets the optimizer order the
batch, answers it through the result cache and the backend, parses the answers and returns
the lookup table. Nothing here knows about DuckDB or Spark.

The seam: :func:`run_call` / :func:`run_agg` take an :class:`LLMCall`, an Arrow table and a
:class:`StepEnv` (what the session lends a step: a backend per model, the optimizer's
context, progress, caches, budget) and return the lookup and the call's
:class:`~llmsql.stats.CallStats`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmsql.step.agg import run_agg
from llmsql.step.llm_step import (
    KnownAnswers,
    StepEnv,
    adapter_ref,
    answer_through_cache,
    bind,
    build_requests,
    distinct_rows,
    known_answers,
    remember,
    render_column,
    result_type,
    run_scalar,
)

if TYPE_CHECKING:
    import pyarrow as pa

    from llmsql.plan import LLMCall
    from llmsql.stats import CallStats


def run_call(call: LLMCall, inputs: pa.Table, env: StepEnv, /) -> tuple[pa.Table, CallStats]:
    """Answer ``call`` over ``inputs``: the lookup table (inputs + result) and its stats.

    An aggregate function (its spec's ``aggregate``) answers one prompt per group
    (:func:`run_agg`); any other, one per distinct input row (:func:`run_scalar`).
    """
    if call.kind.spec.aggregate:
        return run_agg(call, inputs, env)
    return run_scalar(call, inputs, env)


__all__ = [
    "KnownAnswers",
    "StepEnv",
    "adapter_ref",
    "answer_through_cache",
    "bind",
    "build_requests",
    "distinct_rows",
    "known_answers",
    "remember",
    "render_column",
    "result_type",
    "run_agg",
    "run_call",
    "run_scalar",
]
