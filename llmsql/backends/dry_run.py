"""The dry-run backend: answers without a model, for EXPLAIN and cost estimation.

It answers every request with a fixed, valid answer (LLM_FILTER: the first choice, i.e.
``Yes``, so dependent steps see an upper bound of rows; LLM_CLASSIFY: the first label;
LLM_EXTRACT: a JSON object of nulls; free text: the empty string) and counts tokens with the
model's tokenizer when one is available locally, else estimates 1 token per 4 characters.
It is what ``llmsql explain`` runs: a shipped feature, not a test double.

Given an :class:`AnswerSample` (``llmsql explain --sample N``), it answers the sampled prompts
with the model's real answers and every other prompt of a sampled call with one of that
call's real answers picked by a hash of the prompt, so later calls see about as many rows as
the model would pass.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmsql.backends.base import BackendSpec, Capabilities, Request, Response

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence


def estimate_tokens(text: str) -> int:
    """About 4 characters per token, at least 1."""
    return max(1, len(text) // 4)


@dataclass(frozen=True, slots=True)
class AnswerSample:
    """The model's real answers to a sample of some calls' prompts, standing in for the
    model in a dry run.
    """

    known: Mapping[str, str] = field(default_factory=dict)
    """Prompt -> the model's answer text."""
    pools: Mapping[tuple[tuple[str, ...] | None, str], tuple[str, ...]] = field(
        default_factory=dict)
    """(choices, the instruction's text before any placeholder) -> the answers of that
    call's sample: a prompt of the call that was not sampled gets one of them."""

    def answer(self, r: Request) -> str | None:
        """The stand-in answer for ``r``, or None where no sampled call matches it."""
        text = self.known.get(r.prompt)
        if text is not None:
            return text
        for (choices, head), pool in self.pools.items():
            if choices == r.choices and r.prompt.startswith(head):
                return pool[zlib.crc32(r.prompt.encode()) % len(pool)]
        return None


class DryRunBackend:
    """Answers instantly with fixed valid answers; never loads a model."""

    name = "dry-run"

    def __init__(
        self,
        spec: BackendSpec | None = None,
        *,
        capabilities: Capabilities | None = None,
        counter: Callable[[str], int] | None = None,
        sample: AnswerSample | None = None,
    ) -> None:
        self._spec = spec
        self._sample = sample
        self.capabilities = capabilities or Capabilities(
            prefix_caching=True, constrained_choice=True, json_schema=True,
            max_model_len=1 << 20, reports_cached_tokens=False,
        )
        self._count = counter or estimate_tokens
        self.exact_tokens = counter is not None

    def generate(self, batch: Sequence[Request], /) -> list[Response]:
        """Fixed valid answers, one per request, in order."""
        texts: dict[tuple[tuple[str, ...] | None, str | None], str] = {}
        out = []
        for r in batch:
            kind = (r.choices, r.json_schema)
            text = self._sample.answer(r) if self._sample is not None else None
            text = texts.get(kind) if text is None else text
            if text is None:
                text = texts[kind] = self._answer(r)
            # the estimate (estimate_tokens), not the tokenizer: EXPLAIN counts tokens itself
            # on a sample, and tokenizing every prompt here would dominate its run time
            out.append(Response(text, max(1, len(r.prompt) // 4)))
        return out

    @staticmethod
    def _answer(r: Request) -> str:
        if r.choices:
            return r.choices[0]
        if r.json_schema:
            props = json.loads(r.json_schema).get("properties", {})
            return json.dumps(dict.fromkeys(props))
        return ""

    def count_tokens(self, text: str, /) -> int:
        """Tokens of ``text`` (exact with a tokenizer, else estimated)."""
        return self._count(text)

    def model_id(self) -> str:
        """Identity of the model whose tokens are counted."""
        return f"dry-run:{self._spec.model if self._spec else None}"

    def close(self) -> None:
        """Nothing to release."""
