"""Choice probabilities from log-probabilities, for backends that read them from an engine
or a server (LLM_SCORE's ``Request.choice_probs``).

Both helpers return each choice's probability renormalized over the choices, in choice
order, or None where the log-probabilities say nothing about any choice. The transformers
backend computes exact whole-answer probabilities itself (:mod:`llmsql.engine.choices`);
these work from the first answer token only, which decides the choice when every choice
starts differently.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence


def renormalize(logprobs: Sequence[float], /) -> tuple[float, ...] | None:
    """``exp(logprobs)`` scaled to sum to 1 (``-inf``: probability 0); None if all are -inf.

    >>> [round(p, 6) for p in renormalize([math.log(0.3), math.log(0.1), float("-inf")])]
    [0.75, 0.25, 0.0]
    >>> renormalize([float("-inf")]) is None
    True
    """
    top = max(logprobs, default=float("-inf"))
    if top == float("-inf"):
        return None
    weights = [math.exp(lp - top) for lp in logprobs]
    total = math.fsum(weights)
    return tuple(w / total for w in weights)


def from_top_logprobs(
    top: Iterable[tuple[str, float]], choices: Sequence[str], /
) -> tuple[float, ...] | None:
    """The choices' probabilities from the first answer token's top log-probabilities, matched
    by text (an OpenAI-style server's ``top_logprobs``).

    A listed token counts for a choice when its text, without leading whitespace, is that
    choice, or else a non-empty prefix of that choice and of no other (several tokens of one
    choice add up, e.g. ``"Yes"`` and ``" Yes"``); a choice with no listed token gets 0 (it
    was outside the top k). None when no listed token counts for any choice.

    >>> probs = from_top_logprobs([("Yes", math.log(0.6)), (" No", math.log(0.2)),
    ...                            ("The", -1.0)], ("Yes", "No"))
    >>> [round(p, 6) for p in probs]
    [0.75, 0.25]
    >>> from_top_logprobs([("Y", -0.1)], ("Yes", "Yeah")) is None  # tells no choice apart
    True
    """
    mass = [0.0] * len(choices)
    seen: set[str] = set()
    for token, logprob in top:
        text = token.lstrip()
        if not text or token in seen:
            continue
        seen.add(token)
        owners = [j for j, c in enumerate(choices) if c == text] or [
            j for j, c in enumerate(choices) if c.startswith(text)]
        if len(owners) == 1:
            mass[owners[0]] += math.exp(logprob)
    total = math.fsum(mass)
    if total <= 0:
        return None
    return tuple(m / total for m in mass)
