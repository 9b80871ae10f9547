"""The shared LLM step: how prefix warm-ups reach the engine (deterministic rule backend)."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

import llmsql
from llmsql.backends.base import Capabilities, Request, Response
from tests.answers import RuleBackend


class CachingRules(RuleBackend):
    """The rule backend, declared as an engine that caches prefixes across requests but
    computes a batch's requests concurrently (as vLLM does); records every engine call."""

    def __init__(self, cache_tokens: int) -> None:
        super().__init__()
        self.capabilities = Capabilities(prefix_caching=True, block_size=16,
                                         cache_tokens=cache_tokens, constrained_choice=True,
                                         max_model_len=100_000)
        self.batches: list[list[Request]] = []

    def generate(self, batch: Sequence[Request], /) -> list[Response]:
        self.batches.append(list(batch))
        return super().generate(batch)


def reviews() -> pd.DataFrame:
    rows = [(m, f"Synopsis of film {m}: " + "a long and winding plot " * 20, f"review {i} Great"
             if i % 3 == 0 else f"review {i}") for m in range(12) for i in range(8)]
    return pd.DataFrame(rows, columns=["movie", "synopsis", "review"])


QUERY = ("SELECT movie, review, LLM('Summarize the review.', synopsis, review, "
         "max_tokens => 48) AS s FROM t")


def run(backend: RuleBackend, **opts: object) -> pd.DataFrame:
    with llmsql.connect(backend=backend, progress=False, cache=False, **opts) as con:
        con.register("t", reviews())
        return con.sql(QUERY).df().sort_values(["movie", "review"]).reset_index(drop=True)


def is_warmup(r: Request) -> bool:
    return r.max_tokens == 1 and r.choices is None


def test_later_windows_warm_ups_ride_with_the_previous_windows_call() -> None:
    engine = CachingRules(cache_tokens=4000)  # windows: 2,000 tokens of own KV each
    out = run(engine)
    assert len(engine.batches) >= 3
    first, *rest = engine.batches
    assert first and all(is_warmup(r) for r in first)  # the first window's prefixes, alone
    answered = [r for b in rest for r in b if not is_warmup(r)]
    assert len(answered) == len(out) == 96
    carried = [b for b in rest[:-1] if any(is_warmup(r) for r in b)]
    assert carried, "no warm-up rode along with an answer call"
    for b in carried:  # answers first, then the next window's prefixes
        kinds = [is_warmup(r) for r in b]
        assert not kinds[0] and kinds == sorted(kinds)
        for w in (r for r in b if is_warmup(r)):  # each warms prompts of a later call
            later = [r.prompt for c in engine.batches[engine.batches.index(b) + 1:] for r in c]
            assert any(p.startswith(w.prompt) for p in later)
    assert not any(is_warmup(r) for r in rest[-1])  # nothing left to warm after the last
    plain = CachingRules(cache_tokens=4000)
    assert run(plain, warm_prefixes=False).equals(out)  # warm-ups never change answers
    assert not any(is_warmup(r) for b in plain.batches for r in b)
