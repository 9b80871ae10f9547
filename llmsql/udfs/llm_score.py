"""LLM_SCORE(instruction, field, ...) -> DOUBLE in [0, 1]: how likely the answer is Yes.

The prompt is LLM_FILTER's (a yes/no question, the fields as ``name: value`` lines). Where
the backend gives choice probabilities (``Capabilities.choice_probabilities``: the
transformers backend from the model's logits, vLLM through logprobs), the request is
constrained to ``Yes``/``No`` with ``choice_probs`` and the score is P(Yes), renormalized
over the two. Elsewhere the request is free text, with :data:`ASK_NUMBER` appended to the
prompt, and the score is the first number of the answer: ``0.8``, ``.8``, ``80%`` (a
percentage, divided by 100). A number outside [0, 1], or none, is NULL and counted as
unparseable, as is a probability answer that came back without probabilities.

>>> parse("0.8", CallOptions()).value, parse("I'd say 80%.", CallOptions()).value
(0.8, 0.8)
>>> parse('{"Yes": 0.25, "No": 0.75}', CallOptions()).value
0.25
>>> parse("7", CallOptions()).ok, parse("Yes", CallOptions()).ok
(False, False)
"""

from __future__ import annotations

import re

import pyarrow as pa

from llmsql.udfs.base import (
    Abilities,
    CallOptions,
    Constraints,
    Parsed,
    UDFSpec,
    read_choice_probs,
)
from llmsql.udfs.llm_filter import CHOICES

DEFAULT_MAX_TOKENS = 8
ASK_NUMBER = ("Answer with only the probability that the answer is Yes, "
              "a number between 0 and 1.\n")
"""Appended to the prompt where the backend cannot give choice probabilities."""
_NUMBER = re.compile(r"(?<![\w.])([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(%?)")
_PROBS = Constraints(choices=CHOICES, choice_probs=True)
_ASK = Constraints(suffix=ASK_NUMBER)


def parse(text: str, options: CallOptions, /) -> Parsed:
    """P(Yes) from a choice-probability answer, else the answer's first number in [0, 1]."""
    probs = read_choice_probs(text)
    if probs is not None:
        p = probs.get(CHOICES[0])
        if p is not None and 0.0 <= p <= 1.0:
            return Parsed(p, True)
        return Parsed(None, False, f"no probability of {CHOICES[0]!r} in {text[:60]!r}")
    m = _NUMBER.search(text)
    if m is None:
        return Parsed(None, False, f"answer is not a number in [0, 1]: {text[:60]!r}")
    value = float(m.group(1)) / (100.0 if m.group(2) else 1.0)
    if not 0.0 <= value <= 1.0:
        return Parsed(None, False, f"answer is outside [0, 1]: {text[:60]!r}")
    return Parsed(value, True)


def constraints(options: CallOptions, abilities: Abilities, /) -> Constraints:
    """Yes/No with their probabilities where the backend gives them, else ask a number."""
    return _PROBS if abilities.choice_probabilities else _ASK


SPEC = UDFSpec("LLM_SCORE", "SCORE", "DOUBLE", DEFAULT_MAX_TOKENS, parse,
               arrow_type=lambda options: pa.float64(), constraints=constraints)
