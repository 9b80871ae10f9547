"""A tiny random-weight mixture-of-experts model folder the transformers backend can load:
a Mixtral (or OLMoE) config with the embedded SmolLM2's tokenizer (vocabulary 49,152), saved
with ``save_pretrained`` beside copies of SmolLM2's tokenizer files. Loads in about a second
on the CPU; its answers are meaningless but deterministic, and differ from row to row
(untied embeddings with a wide initialization: a tied head would repeat the last prompt
token)."""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")
TINY_SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts_per_tok": 2,
              "max_position_embeddings": 2048}
EXPERTS = 4


def write_tiny_moe(folder: Path, *, family: str = "mixtral", seed: int = 0) -> Path:
    """Write the tiny MoE model into ``folder`` (created) and return it."""
    from transformers import MixtralConfig, OlmoeConfig

    from llmsql.engine import from_config
    from llmsql.models import resolve_model

    smol = resolve_model(None)
    shape = {**TINY_SHAPE, "vocab_size": 49152, "tie_word_embeddings": False, "initializer_range": 0.2,
             "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    config = (MixtralConfig(**shape, num_local_experts=EXPERTS) if family == "mixtral"
              else OlmoeConfig(**shape, num_experts=EXPERTS))
    folder.mkdir(parents=True, exist_ok=True)
    from_config(config, seed=seed, dtype="float32").save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (smol / name).is_file():
            shutil.copy(smol / name, folder / name)
    return folder


def dense_folder() -> Path:
    """The embedded SmolLM2's folder (a dense model), converted if needed."""
    from llmsql.models import resolve_model

    return resolve_model(None)
