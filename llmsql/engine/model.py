"""Getting a model to run: load a checkpoint folder, or build one from a config with random
weights (benchmarks on real architectures need no download: timings depend on shapes only).

Both put the model on its device in eval mode with the engine's attention
(:data:`llmsql.engine.attention.ATTENTION`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from llmsql.engine.attention import attention_implementation

if TYPE_CHECKING:
    import os

    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
"""Dtype names the engine accepts; ``auto`` is float32 on the CPU and bfloat16 on a GPU."""


def resolve_dtype(name: str, device: str) -> str:
    """The concrete dtype name of ``name`` on ``device``.

    >>> resolve_dtype("auto", "cpu"), resolve_dtype("auto", "cuda"), resolve_dtype("float16", "cpu")
    ('float32', 'bfloat16', 'float16')
    """
    if name == "auto":
        return "float32" if device == "cpu" else "bfloat16"
    return name


def torch_dtype(name: str, device: str) -> torch.dtype:
    """The torch dtype of a :data:`DTYPES` name on ``device``."""
    resolved = resolve_dtype(name, device)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[resolved]


def set_threads(threads: int | None) -> None:
    """Set torch's CPU threads (None: leave torch's default)."""
    if threads is not None:
        torch.set_num_threads(threads)


def load_model(
    path: str | os.PathLike[str], /, *, device: str = "cpu", dtype: str = "auto"
) -> PreTrainedModel:
    """Load the causal LM in the Hugging Face folder ``path`` onto ``device``, in eval mode.

    transformers' exceptions propagate; callers at a boundary wrap them.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # no "Loading weights" bars on the user's terminal
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype(dtype, device), attn_implementation=attention_implementation()
    )
    return _ready(model, device)


def load_tokenizer(path: str | os.PathLike[str], /) -> PreTrainedTokenizerBase:
    """The tokenizer saved in the Hugging Face folder ``path``."""
    from transformers import AutoTokenizer

    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(path)
    return tokenizer


def from_config(
    config: PretrainedConfig, /, *, seed: int = 0, device: str = "cpu", dtype: str = "auto"
) -> PreTrainedModel:
    """Build the causal LM that ``config`` describes, with random weights drawn from ``seed``.

    The same config and seed give the same weights; the global torch RNG is left as it was.
    """
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config, dtype=torch_dtype(dtype, device),
            attn_implementation=attention_implementation(),
        )
    return _ready(model, device)


def _ready(model: Any, device: str) -> PreTrainedModel:
    ready: PreTrainedModel = model.to(device).eval()
    return ready


def stop_ids(tokenizer: PreTrainedTokenizerBase | None, model: PreTrainedModel) -> list[int]:
    """Stop tokens: the tokenizer's EOS first, then any from the generation config.

    With no tokenizer (a model built from a config), the config's ``eos_token_id`` alone.
    """
    ids: list[int] = []
    generation = getattr(model, "generation_config", None)
    configured: Any = getattr(generation, "eos_token_id", None)
    if configured is None and tokenizer is None:
        configured = getattr(model.config, "eos_token_id", None)
    extra = configured if isinstance(configured, list) else [configured]
    first = tokenizer.eos_token_id if tokenizer is not None else None
    for tok in [first, *extra]:
        if isinstance(tok, int) and tok not in ids:
            ids.append(tok)
    return ids


def pad_id(tokenizer: PreTrainedTokenizerBase | None, eos: list[int]) -> int:
    """The padding token: the tokenizer's, else the first stop token, else 0."""
    pad = tokenizer.pad_token_id if tokenizer is not None else None
    if isinstance(pad, int):
        return pad
    return eos[0] if eos else 0
