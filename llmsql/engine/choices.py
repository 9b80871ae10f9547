"""Choice scoring: ``log P(choice tokens + <eos> | prompt)`` for every choice of every row.

Every choice of a row reuses the row's prompt KV (the cache rows are repeated, one per
choice), and all choices of a chunk run in one right-padded forward pass. The answer to a
constrained-choice request is the best-scoring choice (:func:`best_choice`); the choices'
probabilities, renormalized over the choices, are the softmax of the scores
(:func:`choice_probabilities`): exact, the likelihood that the model's whole answer is
exactly that choice, given that it is one of them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

import torch

from llmsql.engine.state import cat_columns, long_tensor, right_pad

if TYPE_CHECKING:
    from collections.abc import Sequence

    from transformers import DynamicCache

    from llmsql.engine.state import Rows


class Forward(Protocol):
    """Runs the model on ``ids`` after ``cache``; returns float32 logits of the last ``keep``
    positions (all with ``keep=0``). ``kind`` labels the step for timing.
    """

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                 cache: DynamicCache, keep: int, kind: str) -> torch.Tensor:
        """Logits of the last ``keep`` positions of ``ids`` run after ``cache``."""
        ...


def score_choices(
    forward: Forward, state: Rows, choices: Sequence[Sequence[Sequence[int]]], pad: int
) -> list[list[float]]:
    """Return ``log P(choice tokens | prompt)`` for every choice (token ids) of every row.

    ``state`` is the rows' state after their prompts (its cache is consumed: its rows are
    repeated, one per choice). A choice's tokens should end with the stop token, so that
    the score is that of the whole answer.
    """
    pairs = [(r, list(toks)) for r, row in enumerate(choices) for toks in row]
    device = str(state.logits.device)
    row_of = long_tensor([r for r, _ in pairs], device)
    first = torch.log_softmax(state.logits, dim=-1)[row_of]
    ids, cmask = right_pad([toks for _, toks in pairs], pad, device)
    state.cache.batch_select_indices(row_of)
    mask = cat_columns(state.mask[row_of], cmask)
    pos = state.next_pos[row_of][:, None] + torch.arange(ids.shape[1], device=ids.device)
    logp = torch.log_softmax(forward(ids, mask, pos, state.cache, 0, "score"), dim=-1)
    flat = [choice_logprob(first[n], logp[n], toks) for n, (_, toks) in enumerate(pairs)]
    return regroup(flat, [len(row) for row in choices])


def choice_logprob(first: torch.Tensor, logp: torch.Tensor, tokens: Sequence[int]) -> float:
    """Sum the log-probabilities of ``tokens``: the first from the prompt's last logits."""
    total = float(first[tokens[0]])
    for t in range(1, len(tokens)):
        total += float(logp[t - 1, tokens[t]])
    return total


def best_choice(scores: Sequence[float]) -> int:
    """The index of the best score (the earliest one on a tie).

    >>> best_choice([-2.0, -0.5, -0.5])
    1
    """
    return max(range(len(scores)), key=lambda j: (scores[j], -j))


def score_margin(scores: Sequence[float]) -> float:
    """Best score minus the second best (infinite with one choice).

    >>> score_margin([-1.0, -0.25, -3.0])
    0.75
    """
    if len(scores) < 2:
        return float("inf")
    best, second = sorted(scores, reverse=True)[:2]
    return best - second


def choice_probabilities(scores: Sequence[float]) -> tuple[float, ...]:
    """The softmax of log-probability ``scores``: each choice's probability given that the
    answer is one of the choices (in choice order, summing to 1).

    >>> [round(p, 4) for p in choice_probabilities([math.log(0.3), math.log(0.1)])]
    [0.75, 0.25]
    """
    top = max(scores)
    if top == float("-inf"):
        return tuple(1.0 / len(scores) for _ in scores)
    weights = [math.exp(s - top) for s in scores]
    total = math.fsum(weights)
    return tuple(w / total for w in weights)


def regroup(flat: Sequence[float], sizes: Sequence[int]) -> list[list[float]]:
    """Cut ``flat`` into consecutive lists of ``sizes``.

    >>> regroup([1.0, 2.0, 3.0], [2, 1])
    [[1.0, 2.0], [3.0]]
    """
    out, at = [], 0
    for n in sizes:
        out.append(list(flat[at : at + n]))
        at += n
    return out
