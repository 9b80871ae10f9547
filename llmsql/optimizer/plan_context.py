"""PlanContext: everything a plan-level pass may consult or call, passed explicitly.

Plan-level passes (:data:`llmsql.optimizer.PLAN_PASSES`) rewrite a whole
:class:`~llmsql.plan.QueryPlan` before any of it runs, where the prompt-level rules
(:data:`llmsql.optimizer.RULES`) rewrite one call's batch while it runs. A plan pass may
need figures only the running system can give, such as how selective an LLM filter is;
it gets them through one callback, :attr:`PlanContext.sample`, which the
:class:`~llmsql.session.Session` implements with its engine and backend. Apart from that
callback a pass is pure.

>>> from sqlglot import exp
>>> ctx = PlanContext(sql="SELECT 1", tree=exp.select("1"), sample=lambda call: NO_SAMPLE)
>>> ctx.reorder, ctx.sample_rows
(True, 32)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmsql.plan import LLMCall

if TYPE_CHECKING:
    from sqlglot import exp

SAMPLE_ROWS = 32
"""Rows sampled per filter to estimate its selectivity."""


@dataclass(frozen=True, slots=True)
class PredicateSample:
    """What answering a sample of one LLM filter's inputs measured (the sampler's answer)."""

    rows: int
    """Input rows in the sample."""
    distinct: int
    """Distinct prompts among them."""
    true: int
    """Distinct prompts answered TRUE."""
    prompt_tokens: int
    """Prompt tokens of the prompts the backend answered (cached answers cost none)."""
    answered: int
    """Prompts the backend answered (sent)."""


NO_SAMPLE = PredicateSample(rows=0, distinct=0, true=0, prompt_tokens=0, answered=0)
"""An empty sample (nothing to answer)."""

Sampler = Callable[[LLMCall], PredicateSample]
"""Answers a small LLM filter call (already reduced to a sample of its inputs) with the
session's engine and backend, and reports the counts. Its answers are kept, so the full
run never pays for them again."""


@dataclass(frozen=True, slots=True)
class PlanContext:
    """What plan passes know about one statement, and the one way they reach the system."""

    sql: str
    """The query text (for the planner's messages)."""
    tree: exp.Expression
    """The parsed statement the plan was made from (passes may plan it again, differently)."""
    sample: Sampler
    """Answers a sample call; the only side effect a pass may cause."""
    query_id: str = "q"
    """The statement's query id (prefix of its call ids and lookup names)."""
    reorder: bool = True
    """Whether passes may reorder work (off: the plan runs as written)."""
    sample_rows: int = SAMPLE_ROWS
    """Rows answered per sampled filter."""
