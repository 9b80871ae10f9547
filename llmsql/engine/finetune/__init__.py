"""LoRA fine-tuning co-served with inference in the engine (after FlexLLM): the core.

The pieces:

- :func:`~llmsql.engine.finetune.attach.attach_lora`: LoRA adapters on chosen linear layers
  (PEFT, or the engine's own adapters), everything else frozen;
- :class:`~llmsql.engine.finetune.step.ChunkedStep`: one training sequence's forward in
  token chunks over the KV cache and its backward a few layers at a time, with gradients
  equal to one plain backward;
- :func:`~llmsql.engine.finetune.schedule.plan_iteration`: the token rule (inference first,
  fine-tuning fills the leftover budget);
- :class:`~llmsql.engine.finetune.train.Trainer`: AdamW over the adapter parameters on
  :class:`~llmsql.engine.finetune.train.TrainSeq` sequences, in pieces (``work``) or alone
  (``run``), with atomic checkpoints and resume;
- :class:`~llmsql.engine.finetune.steptime.StepTimeModel`: per-kind least-squares step times
  (inference passes, fine-tuning forward and backward pieces);
- :class:`~llmsql.engine.finetune.coserve.CoServer`: runs trainers in the background while
  no inference runs, and after each inference pass of an
  :class:`~llmsql.engine.runner.Engine` a piece sized to keep the time-per-token objective.

Importing this package imports torch (through :mod:`llmsql.engine`).
"""

from __future__ import annotations

from llmsql.engine.finetune.attach import IMPLS, attach_lora, lora_impl
from llmsql.engine.finetune.coserve import CoServer
from llmsql.engine.finetune.job import CoServeJob, CoServeStats
from llmsql.engine.finetune.schedule import plan_iteration
from llmsql.engine.finetune.step import IGNORE, ChunkedStep
from llmsql.engine.finetune.steptime import BACKWARD, FORWARD, Fit, StepTimeModel
from llmsql.engine.finetune.train import Trainer, TrainSeq

__all__ = [
    "BACKWARD",
    "FORWARD",
    "IGNORE",
    "IMPLS",
    "ChunkedStep",
    "CoServeJob",
    "CoServeStats",
    "CoServer",
    "Fit",
    "StepTimeModel",
    "TrainSeq",
    "Trainer",
    "attach_lora",
    "lora_impl",
    "plan_iteration",
]
