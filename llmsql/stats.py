"""What one LLM call did: the statistics types every layer reads.

The LLM step (:mod:`llmsql.step`) fills a :class:`CallStats` per call while it runs;
results, EXPLAIN ANALYZE, notebooks and progress bars only read them. They live here, below
the step and the executors, so display code depends on this small module alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_ERRORS_KEPT = 1000
"""Per call, the failed or unparseable rows whose reasons are kept for ``last_errors()``."""


@dataclass(frozen=True, slots=True)
class CallError:
    """Why one prompt's row is NULL: the request failed for good, or its answer was unusable."""

    call_id: str
    where: str
    kind: str
    """``failed`` (the backend gave up on it) or ``unparseable`` (the answer did not parse)."""
    reason: str
    prompt: str
    """The prompt's first 200 characters."""


@dataclass(slots=True)
class CallStats:
    """What one LLM call did; filled while it runs."""

    call_id: str
    kind: str
    where: str
    rows_in: int = 0
    distinct_prompts: int = 0
    sent: int = 0
    reused: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cache_unreported: int = 0
    """Sent prompts whose backend did not say how many of their tokens were cached (an
    OpenAI-compatible server without ``prompt_tokens_details``): ``cached_tokens`` then
    undercounts, and the statistics say so instead of showing 0%."""
    output_tokens: int = 0
    warmup_prompts: int = 0
    """Shared prefixes sent alone to warm the prefix cache (``warm_prefixes``)."""
    warmup_tokens: int = 0
    """Prompt tokens those warm-ups computed (not cached)."""
    true_answers: int = 0
    """LLM_FILTER: distinct prompts answered TRUE (selectivity estimates use it)."""
    null_answers: int = 0
    failed: int = 0
    truncated: int = 0
    seconds: float = 0.0
    input_seconds: float = 0.0
    """Time the engine took to compute the call's inputs."""
    generate_seconds: float = 0.0
    """Time spent waiting for answers (backend, cache)."""
    rule_seconds: tuple[tuple[str, float], ...] = ()
    """Per optimizer rule, its name and run time."""
    notes: tuple[str, ...] = ()
    null_reasons: list[str] = field(default_factory=list)
    from_cache: int = 0
    """Prompts answered by the persistent result cache (not sent, not paid)."""
    errors: list[CallError] = field(default_factory=list)
    """Failed and unparseable rows with reasons (the first ``MAX_ERRORS_KEPT``)."""
    moe: str | None = None
    """What expert offload measured during the call (EXPLAIN ANALYZE's line,
    :meth:`llmsql.moe.plan.OffloadStats.describe`); None without offload."""

    @property
    def cached_unknown(self) -> bool:
        """Whether no sent prompt's cached tokens were reported (then there is no share to
        show, rather than 0%).
        """
        return self.sent > 0 and self.cache_unreported >= self.sent


__all__ = ["MAX_ERRORS_KEPT", "CallError", "CallStats"]
