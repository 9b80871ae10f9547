"""Choice scoring: the scores are the model's own log-likelihoods of each whole choice, even
through a shared prefix and padding; probabilities are their softmax."""

from __future__ import annotations

import math
from typing import Any

import torch

from llmsql.engine import Engine, Job, Scored, best_choice, choice_probabilities, score_margin

HEADER = tuple(range(10, 30))
CHOICES = ((11, 2), (12, 13, 2), (14, 2))


def _direct_logprob(model: Any, prompt: tuple[int, ...], choice: tuple[int, ...]) -> float:
    """log P(choice | prompt) from one plain forward pass over prompt + choice."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([[*prompt, *choice]])).logits[0].float()
    steps = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 :]
    return sum(float(steps[t, tok]) for t, tok in enumerate(choice))


def test_scores_are_the_models_log_likelihoods(llama: Any) -> None:
    prompts = [(*HEADER, 1), (*HEADER, 3, 4), (5, 6)]  # two share a prefix, one does not
    jobs = [Job(i, p, choices=CHOICES) for i, p in enumerate(prompts)]
    results = Engine(llama, eos=[2], pad=0).run(jobs)
    assert results[1].cached_tokens == 20
    for prompt, result in zip(prompts, results, strict=True):
        assert isinstance(result, Scored)
        direct = [_direct_logprob(llama, prompt, c) for c in CHOICES]
        assert max(abs(a - b) for a, b in zip(result.scores, direct, strict=True)) < 1e-4


def test_probabilities_are_the_softmax_of_the_scores(llama: Any) -> None:
    (result,) = Engine(llama, eos=[2], pad=0).run([Job(0, (5, 6, 7), choices=CHOICES)])
    assert isinstance(result, Scored)
    probs = choice_probabilities(result.scores)
    total = sum(math.exp(s) for s in result.scores)
    assert [round(p, 9) for p in probs] == [round(math.exp(s) / total, 9) for s in result.scores]
    assert math.isclose(sum(probs), 1.0)
    assert best_choice(result.scores) == max(range(3), key=lambda j: probs[j])


def test_helpers() -> None:
    assert best_choice([-1.0, -1.0]) == 0  # a tie goes to the earliest choice
    assert score_margin([-3.0]) == float("inf")
    assert choice_probabilities([0.0, 0.0]) == (0.5, 0.5)
    assert choice_probabilities([float("-inf"), float("-inf")]) == (0.5, 0.5)
    assert choice_probabilities([0.0, float("-inf")]) == (1.0, 0.0)
