"""Mixture-of-experts offload, the parts that need no torch: the options
(:mod:`~llmsql.moe.options`) and the cost model that picks a plan per call
(:mod:`~llmsql.moe.plan`). The mechanism (host-memory experts, a GPU slot cache, predictors,
prefetch) is :mod:`llmsql.engine.moe`.
"""

from __future__ import annotations

from llmsql.moe.options import (
    OPTION_NAMES,
    PLANS,
    PREDICTORS,
    MoEOptions,
    moe_options,
    parse_cache_size,
)

__all__ = ["OPTION_NAMES", "PLANS", "PREDICTORS", "MoEOptions", "moe_options",
           "parse_cache_size"]
