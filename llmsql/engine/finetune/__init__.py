"""LoRA fine-tuning co-served with inference in the engine (after FlexLLM): the core.

The pieces:

- :func:`~llmsql.engine.finetune.attach.attach_lora`: LoRA adapters on chosen linear layers
  (PEFT, or the engine's own adapters), everything else frozen;
- :class:`~llmsql.engine.finetune.step.ChunkedStep`: one training sequence's forward in
  token chunks over the KV cache and its backward a few layers at a time, with gradients
  equal to one plain backward;
- :func:`~llmsql.engine.finetune.schedule.plan_iteration`: the token rule (inference first,
  fine-tuning fills the leftover budget).

Importing this package imports torch (through :mod:`llmsql.engine`).
"""

from __future__ import annotations

from llmsql.engine.finetune.attach import IMPLS, attach_lora, lora_impl
from llmsql.engine.finetune.schedule import plan_iteration
from llmsql.engine.finetune.step import IGNORE, ChunkedStep

__all__ = ["IGNORE", "IMPLS", "ChunkedStep", "attach_lora", "lora_impl", "plan_iteration"]
