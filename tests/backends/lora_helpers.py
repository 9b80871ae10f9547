"""A real PEFT LoRA adapter for the embedded SmolLM2, and reference answers from
transformers + PEFT (the tests of serving adapters on vLLM and through Spark use them)."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmsql.backends.base import AdapterRef

QUESTIONS = (
    "Is the review positive? Review: A warm, funny film with a great cast.",
    "Is the review positive? Review: Dull, slow and far too long.",
    "Is the review positive? Review: I laughed, I cried, I want to see it again.",
    "Is the review positive? Review: The plot makes no sense at all.",
    "Is the review positive? Review: Solid acting but a forgettable story.",
    "Is the review positive? Review: Not bad.",
)
CHOICES = ("Yes", "No")
FREE_PROMPTS = ("Name a color.", "Write one word about cats.", "Count: 1 2 3")


def _weights_digest(folder: Path) -> str:
    """An adapter's digest as llmsql records it: the sha256 of its weights file."""
    return hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread meanwhile: on a busy 2-core machine two threads run 10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_adapters(root: Path, names: tuple[str, ...], *, scale: float = 0.1,
                  rank: int = 8) -> tuple[AdapterRef, ...]:
    """Save one rank-``rank`` LoRA adapter on q_proj/v_proj of the embedded SmolLM2 per name
    (folder ``root/<name>``), its ``lora_B`` drawn at random (seed: the name's position) so
    that it changes answers.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmsql.models import resolve_model

    model = AutoModelForCausalLM.from_pretrained(str(resolve_model(None)), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank,
                                                  target_modules=["q_proj", "v_proj"]))
    refs = []
    for seed, name in enumerate(names):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, param in peft_model.named_parameters():
                if "lora_B" in pname:
                    param.copy_(torch.randn(param.shape, generator=gen) * scale)
        peft_model.save_pretrained(str(root / name))
        refs.append(AdapterRef(name, str(root / name), _weights_digest(root / name)))
    return tuple(refs)


class PeftReference:
    """The base model with one adapter, through transformers + PEFT (fp32), prompts wrapped
    in the chat template as the backends wrap them."""

    def __init__(self, adapter: AdapterRef) -> None:
        """Load the embedded model and ``adapter`` on it."""
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from llmsql.models import resolve_model

        path = str(resolve_model(None))
        self.tok: Any = AutoTokenizer.from_pretrained(path)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.model: Any = PeftModel.from_pretrained(base, adapter.path).eval()

    def _ids(self, prompt: str) -> Any:
        text = self.tok.apply_chat_template([{"role": "user", "content": prompt}],
                                            tokenize=False, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False, return_tensors="pt").input_ids

    def choice(self, prompt: str, choices: tuple[str, ...]) -> tuple[str, float]:
        """The choice whose first token scores highest, and its logit margin over the next."""
        import torch

        firsts = [self.tok.encode(c, add_special_tokens=False)[0] for c in choices]
        with torch.no_grad(), one_thread():
            logits = self.model(self._ids(prompt)).logits[0, -1]
        scores = sorted(((float(logits[t]), c) for t, c in zip(firsts, choices, strict=True)),
                        reverse=True)
        return scores[0][1], scores[0][0] - scores[1][0]

    def greedy(self, prompt: str, max_tokens: int) -> str:
        """Greedy continuation of ``prompt`` (``max_tokens`` tokens at most)."""
        import torch

        ids = self._ids(prompt)
        with torch.no_grad(), one_thread():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=max_tokens, do_sample=False)
        return str(self.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
