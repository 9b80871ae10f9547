"""Rule: order a scope's LLM_FILTER conjuncts by estimated cost x selectivity.

Filters ANDed in one WHERE are evaluated as a chain: each one sees only the rows that
passed the filters before it, so the order decides how many prompts are sent. For filters
with per-row cost ``c`` and pass rate ``s`` the expected cost ``c1 + s1 c2 + s1 s2 c3 ...`` is
smallest when they run in increasing ``c / (1 - s)`` (the classic predicate-ordering rank).
Selectivity comes from a small sample of each filter's own inputs, answered first with the
real backend; those answers are reused by the full run, never paid twice. Cost comes from
token counts (prompt tokens per input row, distinct prompts per row included).

Invariant: the query's result is unchanged (AND is commutative; every row still meets every
filter before it is returned). Assumes the planner's chaining of WHERE conjuncts.

>>> order = rank([PredicateEstimate((0, 0), 0.9, 300.0), PredicateEstimate((0, 1), 0.1, 500.0)])
>>> sorted(order, key=order.get)
[(0, 1), (0, 0)]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

SAMPLE_ROWS = 32
"""Rows sampled per filter to estimate its selectivity."""


@dataclass(frozen=True, slots=True)
class PredicateEstimate:
    """What the sample said about one LLM_FILTER conjunct."""

    conjunct: tuple[int, int]
    selectivity: float
    """Share of sampled inputs answered TRUE."""
    tokens_per_row: float
    """Prompt tokens the filter costs per input row."""


def rank(estimates: Sequence[PredicateEstimate], /) -> dict[tuple[int, int], float]:
    """Position per conjunct (lower runs first), by cost / (1 - selectivity); ties and
    filters that drop nothing keep the written order."""

    def key(e: PredicateEstimate) -> tuple[float, int]:
        drop = 1.0 - min(max(e.selectivity, 0.0), 1.0)
        return (e.tokens_per_row / drop if drop > 0 else math.inf, e.conjunct[1])

    return {e.conjunct: float(pos) for pos, e in enumerate(sorted(estimates, key=key))}


def estimate(
    conjunct: tuple[int, int], *, rows: int, distinct: int, true: int, prompt_tokens: int,
    answered: int,
) -> PredicateEstimate:
    """An estimate from a sample run's counts (rows sampled, distinct prompts...)."""
    sel = true / distinct if distinct else 1.0
    per_prompt = prompt_tokens / answered if answered else 0.0
    per_row = per_prompt * (distinct / rows if rows else 1.0)
    return PredicateEstimate(conjunct, sel, per_row)
