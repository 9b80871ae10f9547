"""Placement across unequal workers (issue 17, after SplitLLM): the torch-free planning core.

- :mod:`llmsql.placement.deadline`: ``"20m"`` / ISO time / seconds -> seconds from now.
- :mod:`llmsql.placement.profile`: measured worker costs (:class:`RowCost`,
  :class:`LayerProfile`, :class:`Link`, :class:`WorkerProfile`) and :class:`ProfileStore`.
- :mod:`llmsql.placement.rows`: which prefix groups run locally (DP and greedy).
- :mod:`llmsql.placement.layers`: which layer prefix runs locally per length class.

Imports only :mod:`llmsql.errors` and the standard library.
"""

from __future__ import annotations

from llmsql.placement.deadline import parse_deadline
from llmsql.placement.layers import (
    LayerPlan,
    LengthClass,
    SplitCost,
    best_split,
    greedy_split,
    split_costs,
)
from llmsql.placement.profile import (
    FORMAT_VERSION,
    LayerProfile,
    Link,
    ProfileStore,
    RowCost,
    WorkerProfile,
    fit_row_cost,
)
from llmsql.placement.rows import (
    Placement,
    greedy_costs,
    group_seconds,
    place_costs_dp,
    place_rows_dp,
    place_rows_greedy,
)

__all__ = [
    "FORMAT_VERSION",
    "LayerPlan",
    "LayerProfile",
    "LengthClass",
    "Link",
    "Placement",
    "ProfileStore",
    "RowCost",
    "SplitCost",
    "WorkerProfile",
    "best_split",
    "fit_row_cost",
    "greedy_costs",
    "greedy_split",
    "group_seconds",
    "parse_deadline",
    "place_costs_dp",
    "place_rows_dp",
    "place_rows_greedy",
    "split_costs",
]
