"""The embedded model's constrained answers always parse (issue 12, item 1).

Before JSON grammars, LLM_EXTRACT on the transformers backend answered prose ("The price paid
is 100...") and every field was NULL. 50 real Amazon gift-card reviews (shared dataset
amazon_gift_cards_2018, Ni, Li & McAuley 2019), one LLM_EXTRACT and one LLM_CLASSIFY: every
answer must be valid. About a minute of CPU.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

import llmsql
from tests.conftest import DATASETS

ROWS = 50


@pytest.fixture(scope="module")
def reviews() -> object:
    table = pq.read_table(
        DATASETS / "amazon_gift_cards_2018" / "reviews.parquet",
        columns=["reviewer_id", "asin", "summary", "review_text"],
    )
    return table.slice(0, ROWS)


@pytest.mark.model
def test_extract_and_classify_answers_all_parse(
    model_session: llmsql.Session, reviews: object
) -> None:
    model_session.register("gift_reviews", reviews)
    res = model_session.sql(
        "SELECT reviewer_id, asin, "
        "LLM_EXTRACT('From the gift card review, extract the amount of the card in dollars '"
        "'(0 if not said), the occasion it was bought for, and whether the reviewer recommends it.', "
        "schema => 'amount INTEGER, occasion VARCHAR, recommends BOOLEAN', summary, review_text) AS x, "
        "LLM_CLASSIFY('Who was the gift card for?', labels => ['family', 'friend', 'self', "
        "'coworker', 'unknown'], review_text) AS recipient "
        "FROM gift_reviews"
    )
    table = res.arrow()
    assert table.num_rows == ROWS
    extracted = table.column("x").to_pylist()
    assert all(x is not None for x in extracted), [x for x in extracted if x is None]
    for x in extracted:
        assert set(x) == {"amount", "occasion", "recommends"}
        assert isinstance(x["amount"], int) and isinstance(x["occasion"], str)
        assert isinstance(x["recommends"], bool)
    labels = {"family", "friend", "self", "coworker", "unknown"}
    assert set(table.column("recipient").to_pylist()) <= labels
    for call in res.stats.calls:
        assert call.failed == 0 and call.null_answers == 0, call
