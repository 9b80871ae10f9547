"""What expert offload measured during one LLM call (EXPLAIN ANALYZE's ``moe measured`` line).

A backend that offloads a mixture-of-experts model's experts (the transformers backend with
``expert_cache``) has ``moe_stats()``: the offload runtime's cumulative
:class:`~llmsql.moe.plan.OffloadStats`. The step takes it before and after a call; the
difference is the call's. Other backends, and a lazy backend not built yet, measure nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmsql.backends.moe_glue import stats_delta
from llmsql.cache import LazyBackend

if TYPE_CHECKING:
    from llmsql.moe.plan import OffloadStats


def offload_stats(backend: Any, /) -> OffloadStats | None:
    """The backend's cumulative expert offload statistics, or None (no offload, or a lazy
    backend that has not loaded its model).
    """
    if isinstance(backend, LazyBackend):
        if not backend.built:
            return None
        backend = backend.backend()
    measure = getattr(backend, "moe_stats", None)
    return measure() if callable(measure) else None


def offload_line(backend: Any, before: OffloadStats | None, /) -> str | None:
    """The call's ``moe measured`` line: what changed since ``before`` (None: no offload)."""
    after = offload_stats(backend)
    if after is None:
        return None
    return stats_delta(after, before).describe()
