"""Step times: a real run records one entry per forward pass with its shape figures."""

from __future__ import annotations

from typing import Any

from llmsql.engine import Engine, Job, StepTimer

HEADER = tuple(range(10, 30))


def test_a_run_records_every_forward_pass(llama: Any) -> None:
    timer = StepTimer()
    engine = Engine(llama, eos=[2], pad=0, timer=timer)
    prompts = [(*HEADER, 40), (*HEADER, 41, 42), (*HEADER, 43)]
    budget = 4
    results = engine.run([Job(i, p, budget=budget, ignore_eos=True) for i, p in enumerate(prompts)])
    prompt_tokens = sum(len(p) for p in prompts)
    cached = sum(r.cached_tokens for r in results)
    prefix, prefill = timer.of_kind("prefix"), timer.of_kind("prefill")
    assert [(s.rows, s.tokens) for s in prefix] == [(1, 20)]  # the shared prefix, once
    assert [(s.rows, s.tokens, s.tokens_sq) for s in prefill] == [(3, 4, 1 + 4 + 1)]
    assert prefix[0].tokens + prefill[0].tokens == prompt_tokens - cached
    decode = timer.of_kind("decode")
    # the first token comes from the prefill's logits; each later one costs a decode step
    assert len(decode) == budget - 1
    assert [s.rows for s in decode] == [3] * (budget - 1)
    assert [s.tokens for s in decode] == [3] * (budget - 1)
    assert [s.context for s in decode] == [prompt_tokens + 3 * k for k in range(1, budget)]
    assert all(s.seconds > 0 for s in timer.steps)
    assert len(timer.steps) == 2 + budget - 1


def test_scoring_is_recorded_and_the_timer_can_be_cleared(llama: Any) -> None:
    engine = Engine(llama, eos=[2], pad=0)
    engine.run([Job(0, (5, 6, 7), choices=((11, 2), (12, 13, 2)))])  # no timer: nothing kept
    engine.timer = timer = StepTimer()
    engine.run([Job(0, (5, 6, 7), choices=((11, 2), (12, 13, 2)))])
    assert [s.kind for s in timer.steps] == ["prefill", "score"]
    score = timer.steps[1]
    assert (score.rows, score.tokens, score.context) == (2, 5, 3 * 2 + 5)
    timer.clear()
    assert timer.steps == []
