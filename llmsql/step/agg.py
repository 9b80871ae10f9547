"""The LLM_AGG step: one answer per group, map-reduced where a group exceeds the context.

A group's rows are rendered as blocks, sorted (so a group's prompt, and its answer, do not
depend on row order, partitioning or engine), packed into as few prompts as fit the model's
context, answered, and the partial answers reduced with the spec's reduce prompt until one
is left. Prompts are answered and parsed by the scalar step's machinery
(:mod:`llmsql.step.llm_step`), so caching, budgets and errors behave the same.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from llmsql.plan import ARG_PREFIX, GROUP_PREFIX, RESULT_COL, LLMCall
from llmsql.stats import CallStats
from llmsql.step.llm_step import (
    TEMPLATE_OVERHEAD_TOKENS,
    StepEnv,
    _answer_prompts,
    _fit,
    _room,
    render_column,
    result_type,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from llmsql.backends.base import LLMBackend


def _groups(call: LLMCall, inputs: pa.Table) -> tuple[list[int], list[list[str]]]:
    """Group rows by their group keys: first row index per group, and its rendered row blocks
    in sorted order.
    """
    n_keys = len(call.group_keys)
    keys = list(zip(*[inputs.column(f"{GROUP_PREFIX}{k}").to_pylist() for k in range(n_keys)],
                    strict=True)) if n_keys else [()] * inputs.num_rows
    cols = [render_column(inputs.column(f"{ARG_PREFIX}{j}")) for j in range(len(call.fields))]
    first: dict[tuple[Any, ...], int] = {}
    blocks: dict[tuple[Any, ...], list[str]] = {}
    for i, key in enumerate(keys):
        hkey = tuple(repr(k) for k in key)
        first.setdefault(hkey, i)
        row = "".join(f"{f.name}: {c[i]}\n" for f, c in zip(call.fields, cols, strict=True))
        blocks.setdefault(hkey, []).append(row)
    # sorted: a group's prompt (and so its answer) must not depend on the table's row order,
    # its partitioning or the engine
    return list(first.values()), [sorted(rows) for rows in blocks.values()]


def _agg_prompts(instruction: str, rows: list[str], fits: Callable[[str], bool]) -> list[str]:
    """Pack rows into as few prompts as fit (one row always goes in, truncated by _fit)."""
    prompts: list[str] = []
    current: list[str] = []
    for row in rows:
        candidate = instruction + "\n" + "\n".join([*current, row])
        if current and not fits(candidate):
            prompts.append(instruction + "\n" + "\n".join(current))
            current = []
        current.append(row)
    if current:
        prompts.append(instruction + "\n" + "\n".join(current))
    return prompts


def run_agg(call: LLMCall, inputs: pa.Table, env: StepEnv, /) -> tuple[pa.Table, CallStats]:
    """Answer one prompt per group, map-reduce over chunks where a group exceeds the context."""
    start = time.perf_counter()
    stats = CallStats(call.id, call.kind.value, call.where, rows_in=inputs.num_rows)
    firsts, groups = _groups(call, inputs)
    results: list[Any] = []
    if groups:
        backend = env.backend_for(call.options.model)
        budget = _room(call, backend)

        def fits(p: str) -> bool:
            return len(p.encode()) + TEMPLATE_OVERHEAD_TOKENS <= budget or \
                backend.count_tokens(p) <= budget

        chunked = [_agg_prompts(call.template.instruction, rows, fits) for rows in groups]
        env.progress.start(sum(len(c) for c in chunked), call.where)
        results = [_reduce_group(call, chunks, fits, backend, env, stats) for chunks in chunked]
        stats.distinct_prompts = sum(len(c) for c in chunked)
    stats.seconds = time.perf_counter() - start
    gcols = [f"{GROUP_PREFIX}{k}" for k in range(len(call.group_keys))]
    table = inputs.select(gcols).take(pa.array(firsts, type=pa.int64())) if gcols else \
        pa.table({"__llmsql_one": pa.array([True] * len(firsts))})
    return table.append_column(RESULT_COL, pa.array(results, type=result_type(call))), stats


def _reduce_group(call: LLMCall, prompts: list[str], fits: Callable[[str], bool],
                  backend: LLMBackend, env: StepEnv, stats: CallStats) -> Any:
    for _ in range(16):
        fitted = [_fit(call, p, [], backend, stats, env) for p in prompts]
        values = _answer_prompts(call, fitted, (), backend, env, stats)
        if len(values) <= 1:
            return values[0] if values else None
        partial_rows = [f"- {v}\n" for v in values if v]
        if not partial_rows:
            return None
        reduce_prompt = call.kind.spec.reduce_prompt
        assert reduce_prompt is not None  # an aggregate's spec has one
        prompts = _agg_prompts(reduce_prompt(call.template.instruction, []).rstrip("\n"),
                               partial_rows, fits)
    return None
