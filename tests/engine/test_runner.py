"""The batched runner on a tiny random-weight Llama: batched answers equal lone answers,
shared prefixes are computed once, budgets, stop tokens, sampling and grammars hold."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from llmsql.engine import Engine, Generated, Job, Scored

HEADER = tuple(range(10, 30))  # a 20-token shared prefix


def _jobs() -> list[Job]:
    """Four jobs sharing HEADER, two unrelated ones; budgets from 1 to 8 (rows finish at
    different steps, so finished rows are compacted away mid-decode)."""
    tails = [(40, 41), (42,), (43, 44, 45), (46, 47)]
    jobs = [Job(i, (*HEADER, *t), budget=b, ignore_eos=True)
            for i, (t, b) in enumerate(zip(tails, (8, 1, 6, 3), strict=True))]
    return [*jobs, Job(4, (5, 6, 7), budget=5, ignore_eos=True),
            Job(5, (60, 61, 62, 63), budget=8, ignore_eos=True)]


def _engine(model: Any, **kw: Any) -> Engine:
    return Engine(model, eos=[2], pad=0, margin=0.002, **kw)


def test_batched_answers_equal_lone_answers(llama: Any) -> None:
    engine = _engine(llama)
    jobs = _jobs()
    together = engine.run(jobs[::-1])[::-1]
    alone = [engine.run([j])[0] for j in jobs]
    assert all(isinstance(r, Generated) for r in together)
    assert [r.tokens for r in together] == [r.tokens for r in alone]  # type: ignore[union-attr]
    assert [len(r.tokens) for r in together] == [8, 1, 6, 3, 5, 8]  # type: ignore[union-attr]


def test_a_shared_prefix_is_computed_once(llama: Any) -> None:
    results = _engine(llama).run(_jobs())
    cached = [r.cached_tokens for r in results]
    # job 0 comes first in the input and pays; the other three reuse all 20 header tokens
    # plus nothing of their own (their suffixes differ)
    assert cached == [0, 20, 20, 20, 0, 0]
    assert all(r.cached_tokens == 0 for r in (_engine(llama).run([j])[0] for j in _jobs()))


def test_greedy_stops_at_the_stop_token(llama: Any) -> None:
    engine = _engine(llama)
    free = engine.run([Job(0, (5, 6, 7), budget=12, ignore_eos=True)])[0]
    assert isinstance(free, Generated) and not free.stopped
    first = free.tokens[0]
    stopping = Engine(llama, eos=[first], pad=0).run([Job(0, (5, 6, 7), budget=12)])[0]
    assert isinstance(stopping, Generated)
    assert stopping.tokens == (first,) and stopping.stopped


def test_seeded_sampling_is_reproducible(llama: Any) -> None:
    job = Job(0, (5, 6, 7), budget=10, temperature=1.0, seed=7, ignore_eos=True)
    engine = _engine(llama)
    first, second = engine.run([job])[0], engine.run([job])[0]
    other = engine.run([Job(0, (5, 6, 7), budget=10, temperature=1.0, seed=8,
                            ignore_eos=True)])[0]
    assert first == second
    assert first != other


class _OnlyToken:
    """A real two-state grammar: token ``token`` once, then the answer ends."""

    initial = 0

    def __init__(self, token: int) -> None:
        self.token = token

    def mask(self, state: int, left: int, vocab: int, device: str) -> torch.Tensor:
        allowed = torch.zeros(vocab, dtype=torch.bool, device=device)
        allowed[self.token] = state == 0
        return allowed

    def next_state(self, state: int, token: int) -> int | None:
        return 1 if state == 0 and token == self.token else None

    def is_done(self, state: int) -> bool:
        return state == 1


def test_a_grammar_constrains_the_tokens(llama: Any) -> None:
    job = Job(0, (5, 6, 7), budget=10, grammar=_OnlyToken(77))
    (result,) = _engine(llama).run([job])
    assert isinstance(result, Generated) and result.tokens == (77,)


def test_choices_are_scored_and_results_keep_input_order(llama: Any) -> None:
    choices = ((11, 2), (12, 13, 2), (14, 2))
    jobs = [Job(0, (5, 6, 7), budget=4), Job(1, (*HEADER, 1), choices=choices),
            Job(2, (*HEADER, 3), choices=choices[:2])]
    results = _engine(llama).run(jobs)
    assert [type(r) for r in results] == [Generated, Scored, Scored]
    assert [len(r.scores) for r in results[1:]] == [3, 2]  # type: ignore[union-attr]
    assert all(s < 0 for r in results[1:] for s in r.scores)  # type: ignore[union-attr]


def test_near_ties_are_rerun_on_the_canonical_path(llama: Any) -> None:
    """A huge margin makes every batched decision "nearly tied": all are re-decided alone,
    and the answers are still those of lone runs."""
    engine = Engine(llama, eos=[2], pad=0, margin=1e9)
    jobs = _jobs()
    together = engine.run(jobs)
    assert engine.canonical_reruns == len(jobs)
    assert [r.tokens for r in together] == [  # type: ignore[union-attr]
        r.tokens for r in (engine.run([j])[0] for j in jobs)  # type: ignore[union-attr]
    ]


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_chunking_does_not_change_answers(llama: Any, batch_size: int) -> None:
    expected = [r.tokens for r in _engine(llama).run(_jobs())]  # type: ignore[union-attr]
    got = _engine(llama, batch_size=batch_size).run(_jobs())
    assert [r.tokens for r in got] == expected  # type: ignore[union-attr]
