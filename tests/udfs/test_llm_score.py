"""LLM_SCORE (issue 14, item 3): the sixth function, added as udfs/llm_score.py plus one line
of the dialect, returns a DOUBLE in [0, 1] on DuckDB: P(Yes) where the backend gives choice
probabilities, else the number the model answers; NULL and counted when there is none.

The plumbing tests answer with the deterministic rule backend of tests/answers.py (extended
to give probabilities, or numbers); what the model answers is tested on the real embedded
SmolLM2 (marker ``model``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import llmsql
from llmsql.backends.base import Request, Response
from llmsql.errors import PlanError
from llmsql.udfs import SPECS, CallKind
from llmsql.udfs.base import CallOptions
from llmsql.udfs.llm_score import ASK_NUMBER, parse
from tests.answers import RuleBackend, fields_of
from tests.conftest import DATASETS

REVIEWS = pa.table({"id": [1, 2, 3, 4, 5, 6],
                    "review": ["Great fun", "Too sweet", "Tense", "Great fun", "Long", "Odd"]})
QUERY = "SELECT id, LLM_SCORE('Is the review positive?', review) AS p FROM reviews ORDER BY id"


def p_yes(review: str) -> float:
    """The probability the probability backend gives: not a short decimal, so a value that
    went through text and back shows any rounding."""
    return 1 / (2 + len(review)) + (0.5 if "Great" in review else 0.0)


class ProbBackend(RuleBackend):
    """The rule backend, reporting choice probabilities (``give``: whether it returns them)."""

    def __init__(self, give: bool = True) -> None:
        super().__init__()
        self.capabilities = dataclasses.replace(self.capabilities, choice_probabilities=True)
        self.give = give
        self.requests: list[Request] = []

    def generate(self, batch: Sequence[Request], /) -> list[Response]:
        self.requests += batch
        out = super().generate(batch)
        return [dataclasses.replace(r, choice_probs=self._probs(q)) if q.choice_probs and self.give
                else r for q, r in zip(batch, out, strict=True)]

    @staticmethod
    def _probs(q: Request) -> tuple[float, float]:
        p = p_yes(fields_of(q.prompt)["review"])
        return (p, 1 - p)


class NumberBackend(RuleBackend):
    """A backend without choice probabilities: answers free text, a number or not."""

    ANSWERS: ClassVar[dict[str, str]] = {"Great fun": "0.9", "Too sweet": "About 25%.", "Tense": ".5",
                                         "Long": "Yes", "Odd": "1.5"}

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []

    def generate(self, batch: Sequence[Request], /) -> list[Response]:
        self.requests += batch
        return [Response(self.ANSWERS[fields_of(q.prompt)["review"]], 10, output_tokens=2)
                for q in batch]


def _run(backend: object, query: str = QUERY, **kw: object) -> llmsql.Result:
    with llmsql.connect(backend=backend, progress=False, **kw) as con:
        con.register("reviews", REVIEWS)
        res = con.sql(query)
        res.arrow()
        return res


# ---- the function --------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("0.8", 0.8), (" 0.25\n", 0.25), (".5", 0.5), ("1", 1.0), ("0", 0.0), ("80%", 0.8),
    ("I'd say 0.7.", 0.7), ("Probability: 100 %", 1.0), ('{"Yes": 0.125, "No": 0.875}', 0.125),
])
def test_a_number_in_range_is_the_score(text: str, value: float) -> None:
    parsed = parse(text, CallOptions())
    assert parsed.ok and parsed.value == value


@pytest.mark.parametrize("text", ["Yes", "", "1.5", "-0.2", "150%", "7 out of 10",
                                  '{"No": 1.0}', '{"Yes": 2.0, "No": -1.0}'])
def test_no_number_in_range_is_null(text: str) -> None:
    parsed = parse(text, CallOptions())
    assert not parsed.ok and parsed.value is None and parsed.reason


def test_the_spec_is_all_the_engine_knows() -> None:
    spec = SPECS["LLM_SCORE"]
    assert CallKind.SCORE.spec is spec and spec.sql_type == "DOUBLE"
    assert spec.arrow_type(CallOptions()) == pa.float64()
    assert not spec.aggregate and not spec.predicate


def test_score_plans_and_checks_options_like_the_others() -> None:
    with llmsql.connect(dry_run=True, progress=False) as con:
        con.register("reviews", REVIEWS)
        (plan,) = con.plan("SELECT LLM_SCORE('Good?', review, max_tokens => 3) FROM reviews")
        assert plan.calls[0].kind is CallKind.SCORE
        assert plan.calls[0].options.max_tokens == 3
        with pytest.raises(PlanError, match="'labels' belongs to LLM_CLASSIFY"):
            con.plan("SELECT LLM_SCORE('Good?', review, labels => ['a', 'b']) FROM reviews")
        with pytest.raises(PlanError, match="first argument of LLM_SCORE"):
            con.plan("SELECT LLM_SCORE(review) FROM reviews")
        text = con.explain("SELECT LLM_SCORE('Good?', review) FROM reviews").text
    assert "LLM_SCORE(...) at line 1" in text and "expected output tokens" in text


# ---- where the backend gives probabilities ----------------------------------------------------


def test_probability_of_yes_where_the_backend_gives_it(tmp_path: object) -> None:
    backend = ProbBackend()
    res = _run(backend, cache=str(tmp_path / "r.sqlite"))  # type: ignore[operator]
    table = res.arrow()
    assert table.schema.field("p").type == pa.float64()
    assert table.column("p").to_pylist() == [p_yes(r) for r in REVIEWS.column("review").to_pylist()]
    assert all(q.choices == ("Yes", "No") and q.choice_probs for q in backend.requests)
    assert not any(q.prompt.endswith(ASK_NUMBER) for q in backend.requests)
    # 5 distinct reviews, each sent once
    assert len(backend.requests) == 5 and res.stats.calls[0].null_answers == 0


def test_a_cached_score_keeps_its_probability(tmp_path: object) -> None:
    cache = str(tmp_path / "r.sqlite")  # type: ignore[operator]
    # max_tokens as LLM_FILTER's: the requests differ from the filter's only in asking
    # probabilities, so neither is answered with the other's cached answer
    query = QUERY.replace("review) AS p", "review, max_tokens => 4) AS p")
    scored = ProbBackend()
    first = _run(scored, query, cache=cache).arrow()
    assert [(q.max_tokens, q.choice_probs) for q in scored.requests] == [(4, True)] * 5
    again = ProbBackend()
    res = _run(again, query, cache=cache)
    assert res.arrow().equals(first)
    assert again.requests == [] and res.stats.calls[0].from_cache == 5
    flt = ProbBackend()
    passed = _run(flt, "SELECT id FROM reviews WHERE LLM_FILTER('Is the review positive?', "
                  "review) ORDER BY id", cache=cache)
    assert passed.arrow().column("id").to_pylist() == [1, 4]
    assert [(q.max_tokens, q.choice_probs) for q in flt.requests] == [(4, False)] * 5


def test_an_answer_without_probabilities_is_null_and_counted() -> None:
    res = _run(ProbBackend(give=False), cache=False)
    assert res.arrow().column("p").to_pylist() == [None] * 6
    call = res.stats.calls[0]
    assert call.null_answers == 5 and all("not a number" in r for r in call.null_reasons)


# ---- elsewhere: the number in the answer -------------------------------------------------------


def test_number_parsed_where_the_backend_gives_no_probabilities() -> None:
    backend = NumberBackend()
    res = _run(backend, cache=False)
    assert res.arrow().column("p").to_pylist() == [0.9, 0.25, 0.5, 0.9, None, None]
    assert res.stats.calls[0].null_answers == 2  # "Yes" and 1.5
    assert all(q.prompt.endswith(ASK_NUMBER) and q.choices is None and not q.choice_probs
               for q in backend.requests)
    assert backend.requests[0].prompt == ("Is the review positive?\nreview: Great fun\n"
                                          + ASK_NUMBER)


def test_dataframe_score_column(tmp_path: object) -> None:
    with llmsql.connect(backend=ProbBackend(), progress=False, cache=False) as con:
        out = llmsql.frame(REVIEWS, session=con).score("Is the review positive?", "review")
    assert out.column_names == ["id", "review", "score"]
    assert out.column("score").to_pylist() == [p_yes(r) for r in REVIEWS.column("review").to_pylist()]


# ---- the real model ---------------------------------------------------------------------------

ROWS = 12


@pytest.fixture(scope="module")
def gift_reviews() -> pa.Table:
    table = pq.read_table(DATASETS / "amazon_gift_cards_2018" / "reviews.parquet",
                          columns=["reviewer_id", "summary"])
    return table.slice(0, ROWS)


def p_yes_from_logits(prompts: Sequence[str]) -> list[float]:
    """P(Yes) over {Yes, No} computed with Hugging Face transformers alone, as the
    transformers backend documents it: the softmax of log P(choice tokens + EOS | prompt in
    the chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmsql.models import resolve_model

    folder = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    out = []
    for prompt in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                       add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False).input_ids
        scores = []
        for choice in ("Yes", "No"):
            tail = [*tok(choice, add_special_tokens=False).input_ids, tok.eos_token_id]
            with torch.no_grad():
                logits = model(torch.tensor([ids + tail])).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            scores.append(sum(logp[len(ids) - 1 + k, t].item() for k, t in enumerate(tail)))
        out.append(math.exp(scores[0]) / (math.exp(scores[0]) + math.exp(scores[1])))
    return out


@pytest.mark.model
def test_model_scores_are_probabilities_or_counted_nulls(
    model_session: llmsql.Session, gift_reviews: pa.Table
) -> None:
    model_session.register("gift_score", gift_reviews)
    question = "Is the reviewer happy with the gift card?"
    res = model_session.sql(
        f"SELECT reviewer_id, LLM_SCORE('{question}', summary) AS p, "
        f"LLM_FILTER('{question}', summary) AS ok FROM gift_score")
    table = res.arrow()
    assert table.schema.field("p").type == pa.float64()
    scores, passed = table.column("p").to_pylist(), table.column("ok").to_pylist()
    assert all(p is None or 0.0 <= p <= 1.0 for p in scores)
    score_call = next(c for c in res.stats.calls if c.kind == "LLM_SCORE")
    distinct = len(set(gift_reviews.column("summary").to_pylist()))
    nulls = len({s for s, p in zip(gift_reviews.column("summary").to_pylist(), scores,
                                   strict=True) if p is None})
    assert score_call.null_answers == nulls and score_call.distinct_prompts == distinct
    if model_session.backend().capabilities.choice_probabilities:
        # P(Yes), renormalized over Yes/No: never exactly 0 or 1, and above one half exactly
        # where LLM_FILTER (the likelier of the two choices) says TRUE
        assert all(p is not None and 0.0 < p < 1.0 for p in scores), scores
        assert [p > 0.5 for p in scores] == passed
        summaries = gift_reviews.column("summary").to_pylist()[:4]
        want = p_yes_from_logits([f"{question}\nsummary: {s}\n" for s in summaries])
        assert scores[:4] == pytest.approx(want, abs=1e-4)
    # else: the number SmolLM2 answers, where it answers one (it mostly says yes or no)
    again = model_session.sql(
        f"SELECT reviewer_id, LLM_SCORE('{question}', summary) AS p FROM gift_score")
    assert again.arrow().column("p").to_pylist() == scores  # from the result cache
    assert again.stats.calls[0].sent == 0
