"""The GPU benchmark's workloads: ../shared/bench/WORKLOADS.md, run through llmsql itself.

The SQL is WORKLOADS.md's, with one addition each for free-text calls: a fixed output
length (`max_tokens`; the engine runs with `ignore_eos`, since random weights never stop on
their own): aggregation 2 tokens, RAG 16, projection 48. LLM_FILTER is constrained to
Yes/No and ends by itself.
"""

from __future__ import annotations

from dataclasses import dataclass

MOVIES_Q = ("Given the movie information and a critic review, does the review recommend "
            "watching the movie? Answer Yes or No.")
SUMMARY_Q = "Summarize in one sentence what the critic liked or disliked about the movie."
RATE_Q = ("Rate the sentiment of the review from 1 (bad) to 5 (good). Answer with a single "
          "integer.")


@dataclass(frozen=True)
class Table:
    """A benchmark table slice: the rows with the smallest ``key`` (or all rows)."""

    name: str
    path: str  # relative to the datasets folder
    key: str | None
    rows: int | None


@dataclass(frozen=True)
class Workload:
    """One query over one table."""

    wid: str
    title: str
    table: str
    sql: str
    paper_ggr_speedup: float | None  # the paper's GGR speedup over cache + unordered rows (L4)


TABLES = {
    "movie_reviews": Table("movie_reviews", "rotten_tomatoes_flatiron/movie_reviews.parquet",
                           "review_id", 15_000),
    "beer_reviews": Table("beer_reviews", "ratebeer_reviews/beer_reviews.parquet",
                          "review_id", 28_479),
    "squad_dev": Table("squad_dev", "squad_v1_1_dev/squad_dev.parquet", None, None),
    "movies_small": Table("movies_small", "llmsql_paper_movies_sample/movies_small.parquet",
                          None, None),
}

WORKLOADS = (
    Workload("W1", "movies filter", "movie_reviews",
             f"SELECT review_id FROM movie_reviews WHERE LLM_FILTER('{MOVIES_Q}', synopsis, "
             "genre, director, review)", 2.5),
    Workload("W1b", "movies projection", "movie_reviews",
             f"SELECT review_id, LLM('{SUMMARY_Q}', synopsis, genre, review, max_tokens => 48) "
             "AS summary FROM movie_reviews", 2.4),
    Workload("W1c", "movies multi-LLM", "movie_reviews",
             f"SELECT review_id, LLM('{SUMMARY_Q}', synopsis, genre, review, max_tokens => 48) "
             f"AS summary FROM movie_reviews WHERE LLM_FILTER('{MOVIES_Q}', synopsis, genre, "
             "director, review)", 1.7),
    Workload("W1d", "movies aggregation", "movie_reviews",
             f"SELECT movie_id, AVG(TRY_CAST(LLM('{RATE_Q}', synopsis, review, max_tokens => 2) "
             "AS INTEGER)) AS score FROM movie_reviews GROUP BY movie_id", 2.5),
    Workload("W2", "beer filter", "beer_reviews",
             "SELECT review_id FROM beer_reviews WHERE LLM_FILTER('Does the reviewer recommend "
             "this beer? Answer Yes or No.', beer_name, style, brewery, location, review)", 2.0),
    Workload("W3", "squad RAG", "squad_dev",
             "SELECT id, LLM('Answer the question using only the context. Answer with a short "
             "phrase.', title, context, question, max_tokens => 16) AS answer FROM squad_dev",
             1.7),
    Workload("W4", "paper movies", "movies_small",
             f"SELECT id FROM movies_small WHERE LLM_FILTER('{MOVIES_Q}', movie_title, "
             "movie_info, review_content)", None),
)
