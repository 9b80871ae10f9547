"""The routing table of a routing trace: per frequent token id, each MoE layer's most frequent
experts (what the ``expert_order`` rule predicts rows' experts with, :mod:`llmsql.moe.affinity`).

``llmsql moe-profile`` builds it from the trace it records and stores it beside the predictor
(:func:`llmsql.moe.affinity.table_path`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from llmsql.errors import ConfigError
from llmsql.moe.affinity import DEFAULT_TABLE_TOKENS, RoutingTable

if TYPE_CHECKING:
    from llmsql.engine.moe.trace import RoutingTrace


def routing_table(trace: RoutingTrace, *, max_tokens: int = DEFAULT_TABLE_TOKENS
                  ) -> RoutingTable:
    """Count, for the ``max_tokens`` most frequent token ids of ``trace``, how often each
    layer routed them to each expert, and keep each layer's ``top_k`` most frequent (ties: the
    lower expert).

    Raises:
        ConfigError: the trace has no token ids (recorded before they were kept).
    """
    if trace.token_ids is None:
        msg = ("the routing trace has no token ids (recorded by an older llmsql); record it "
               "again with record_routing or `llmsql moe-profile`")
        raise ConfigError(msg)
    ids = trace.token_ids.long()
    uniq, counts = torch.unique(ids, return_counts=True)
    keep = uniq[torch.argsort(-counts, stable=True)[:max_tokens]]
    keep = torch.sort(keep).values
    row = torch.searchsorted(keep, ids).clamp(max=max(len(keep) - 1, 0))
    known = keep[row] == ids
    e, k = trace.num_experts, trace.top_k
    tie_break = torch.arange(e, 0, -1, dtype=torch.float64) / (e + 1)  # lower expert first
    per_layer = []
    for layer in trace.layers:
        routes = trace.routes[layer][known].long()
        hist = torch.zeros(len(keep), e, dtype=torch.float64)
        hist.index_put_((row[known].repeat_interleave(routes.shape[1]), routes.reshape(-1)),
                        torch.ones(routes.numel(), dtype=torch.float64), accumulate=True)
        per_layer.append(torch.topk(hist + tie_break, min(k, e), dim=1).indices.tolist())
    experts = {int(t): tuple(tuple(per_layer[p][r]) for p in range(len(trace.layers)))
               for r, t in enumerate(keep.tolist())}
    return RoutingTable(tuple(trace.layers), e, k, experts, trace.model, trace.num_tokens)
