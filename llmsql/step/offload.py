"""What expert offload measured during one LLM call (EXPLAIN ANALYZE's ``moe measured`` line).

A backend that offloads a mixture-of-experts model's experts (the transformers backend with
``expert_cache``) has ``moe_stats()``: the offload runtime's cumulative
:class:`~llmsql.moe.plan.OffloadStats`. The step takes it before and after a call; the
difference is the call's. Other backends, and a lazy backend not built yet, measure nothing.
On Spark the backend is a worker client (:class:`llmsql.backends.worker.WorkerClient`), whose
``moe_stats()`` sums the counters its worker's replies carried; the driver adds the tasks'
measurements up (:func:`llmsql.executors.spark.tasks.merge_stats`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmsql.backends.moe_glue import backend_moe_stats, stats_delta
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
    return backend_moe_stats(backend)


def offload_delta(backend: Any, before: OffloadStats | None, /) -> OffloadStats | None:
    """What the backend's expert offload measured since ``before`` (None: no offload)."""
    after = offload_stats(backend)
    return stats_delta(after, before) if after is not None else None


def offload_line(backend: Any, before: OffloadStats | None, /) -> str | None:
    """The call's ``moe measured`` line: what changed since ``before`` (None: no offload)."""
    delta = offload_delta(backend, before)
    return delta.describe() if delta is not None else None
