"""Mixture-of-experts expert offload inside llmsql's engine (after ProMoE); see
:mod:`~llmsql.engine.moe.offload` for the mechanism, :mod:`~llmsql.engine.moe.predictors`
for the predictors, :mod:`~llmsql.engine.moe.cache` for the slot table, and
:mod:`llmsql.moe` for the options and the cost model (torch-free).
"""

from __future__ import annotations

from llmsql.engine.moe.cache import SlotTable
from llmsql.engine.moe.install import check_moe_model, offload_experts
from llmsql.engine.moe.offload import ExpertOffload, OffloadedExperts
from llmsql.engine.moe.predictors import NextRouter, NoPredictor, Oracle, Predictor, routers_of
from llmsql.engine.moe.trace import moe_layer_index

__all__ = ["ExpertOffload", "NextRouter", "NoPredictor", "OffloadedExperts", "Oracle",
           "Predictor", "SlotTable", "check_moe_model", "moe_layer_index", "offload_experts",
           "routers_of"]
