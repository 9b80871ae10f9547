"""End-to-end semantics on real DuckDB, answered by the deterministic rule function.

Each query's expected result is computed with plain SQL that applies the same rule, so the
planner's lifting of LLM calls (WHERE, SELECT, GROUP BY, CTEs, subqueries, joins) is checked
against DuckDB itself.
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pytest

import llmsql
from llmsql.errors import ConfigError, ContextLengthError, PlanError
from tests.answers import RuleBackend


@pytest.fixture
def con(rule: RuleBackend, reviews: pd.DataFrame):  # type: ignore[no-untyped-def]
    s = llmsql.connect(backend=rule, progress=False)
    s.register("reviews", reviews)
    s.register("movies", pd.DataFrame({"movie": ["Up", "Heat"], "year": [2009, 1995]}))
    yield s
    s.close()


def rows(con: llmsql.Session, sql: str) -> list[tuple]:
    return [tuple(r) for r in con.sql(sql).df().itertuples(index=False)]


def plain(con: llmsql.Session, sql: str) -> list[tuple]:
    return [tuple(r) for r in con.duckdb.sql(sql).df().itertuples(index=False)]


def test_filter_in_where(con: llmsql.Session) -> None:
    got = rows(con, "SELECT id FROM reviews WHERE LLM_FILTER('Good?', review) ORDER BY id")
    assert got == plain(con, "SELECT id FROM reviews WHERE review LIKE '%Great%' ORDER BY id")
    assert got == [(1,), (4,)]


def test_map_in_select_with_cheap_filter_first(con: llmsql.Session, rule: RuleBackend) -> None:
    got = rows(con, "SELECT id, LLM('Say', movie, review) AS s FROM reviews WHERE stars >= 4 "
                    "ORDER BY id")
    assert got == [(1, "GREAT FUN | UP"), (3, "HEAT | TENSE"), (4, "GREAT FUN | HEAT")]
    assert len(rule.prompts) == 3  # only rows passing stars >= 4 were sent


def test_null_field_renders_empty(con: llmsql.Session, rule: RuleBackend) -> None:
    got = rows(con, "SELECT LLM('Say', movie, review) AS s FROM reviews WHERE id = 6")
    assert got == [("| ODD",)]  # answers are stripped
    assert "movie: \n" in rule.prompts[0]


def test_dedup_evaluates_each_distinct_input_once(con: llmsql.Session, rule: RuleBackend) -> None:
    got = rows(con, "SELECT id, LLM('Say', review) AS s FROM reviews ORDER BY id")
    assert got[0][1] == got[3][1] == "GREAT FUN"
    assert len(rule.prompts) == 5  # 6 rows, 'Great fun' twice


def test_aggregate_over_llm_results_group_by(con: llmsql.Session) -> None:
    res = con.sql("SELECT movie, SUM(CAST(LLM_FILTER('Good?', review) AS INT)) AS n "
                  "FROM reviews GROUP BY movie ORDER BY movie NULLS LAST")
    same = con.duckdb.sql("SELECT movie, SUM(CAST(review LIKE '%Great%' AS INT)) AS n "
                          "FROM reviews GROUP BY movie ORDER BY movie NULLS LAST")
    # Typed as DuckDB types its own result: SUM over INT is HUGEINT, decimal128(38, 0) in
    # Arrow; in pandas an integer (nullable Int64), never a Python Decimal nor a float.
    assert res.arrow().equals(same.to_arrow_table())
    assert res.arrow().schema.field("n").type == pa.decimal128(38, 0)
    assert str(res.df()["n"].dtype) == "Int64"
    pd.testing.assert_frame_equal(res.df(), same.df().astype({"n": "Int64"}))
    df = res.df()
    got = list(zip(df["movie"].tolist(), df["n"].tolist(), strict=True))
    # The NULL key is pandas' own missing string: None in pandas 2's object dtype, NaN in
    # pandas 3's default str dtype (what pandas itself makes of None in a string column).
    missing = pd.Series([None, "x"]).tolist()[0]
    assert repr(got) == repr([("Heat", 1), ("Up", 1), (missing, 0)])


def test_group_by_a_classification(con: llmsql.Session) -> None:
    got = rows(con, "SELECT LLM_CLASSIFY('Kind', labels => ['long', 'short'], review) AS k, "
                    "COUNT(*) AS n FROM reviews GROUP BY k ORDER BY k")
    assert got == plain(con, "SELECT CASE WHEN length(review) > 4 THEN 'long' ELSE 'short' END "
                             "AS k, COUNT(*) AS n FROM reviews GROUP BY k ORDER BY k")


def test_llm_agg_per_group(con: llmsql.Session) -> None:
    got = rows(con, "SELECT movie, LLM_AGG('Count the reviews', review) AS n FROM reviews "
                    "WHERE movie IS NOT NULL GROUP BY movie ORDER BY movie")
    assert got == [("Heat", "3"), ("Up", "2")]


def test_llm_agg_map_reduce_when_a_group_exceeds_the_context(reviews: pd.DataFrame) -> None:
    big = pd.DataFrame({"g": [1] * 300, "review": [f"review number {i}" for i in range(300)]})
    rule = RuleBackend(max_model_len=400)
    with llmsql.connect(backend=rule, progress=False) as con:
        con.register("big", big)
        got = rows(con, "SELECT g, LLM_AGG('Count the reviews', review) AS n FROM big GROUP BY g")
    assert got == [(1, "300")]
    assert rule.calls == 2 and len(rule.prompts) > 2  # chunks answered, then combined


def test_extract_returns_a_typed_struct(con: llmsql.Session) -> None:
    df = con.sql("SELECT id, LLM_EXTRACT('Extract json', schema => 'word VARCHAR, n INTEGER', "
                 "review) AS e FROM reviews WHERE id = 1").df()
    assert df["e"][0] == {"word": "Great", "n": 9}


def test_extract_fields_usable_in_sql(con: llmsql.Session) -> None:
    got = rows(con, "SELECT id FROM (SELECT id, LLM_EXTRACT('Extract json', schema => "
                    "'word VARCHAR, n INTEGER', review) AS e FROM reviews) WHERE e.n > 5 "
                    "ORDER BY id")
    assert got == [(1,), (2,), (4,)]


def test_cte_subquery_and_join(con: llmsql.Session) -> None:
    got = rows(con, """
        WITH good AS (SELECT id, movie FROM reviews WHERE LLM_FILTER('Good?', review))
        SELECT g.id, m.year FROM good AS g JOIN movies AS m ON g.movie = m.movie
        WHERE g.id IN (SELECT id FROM reviews WHERE LLM_FILTER('Good?', genre, review))
        ORDER BY g.id""")
    assert got == [(1, 2009), (4, 1995)]


def test_llm_over_joined_rows(con: llmsql.Session) -> None:
    got = rows(con, "SELECT r.id, LLM('Say', m.year, r.review) AS s FROM reviews r JOIN movies m "
                    "USING (movie) WHERE r.id < 3 ORDER BY r.id")
    assert got == [(1, "2009 | GREAT FUN"), (2, "2009 | TOO SWEET")]


def test_user_order_by_is_kept_after_reordering(con: llmsql.Session) -> None:
    got = rows(con, "SELECT id, LLM('Say', genre, review) FROM reviews ORDER BY stars DESC, id")
    assert [r[0] for r in got] == [1, 4, 3, 5, 2, 6]


def test_optimized_and_unoptimized_plans_agree(rule: RuleBackend, reviews: pd.DataFrame) -> None:
    sql = ("SELECT id, LLM('Say', genre, movie, review) AS s, LLM_FILTER('Good?', movie, review) "
           "AS f FROM reviews ORDER BY id")
    results = []
    for optimize in (True, False):
        with llmsql.connect(backend=RuleBackend(), progress=False, optimize=optimize) as con:
            con.register("reviews", reviews)
            results.append(con.sql(sql).arrow())
    assert results[0].equals(results[1])


def test_unconstrained_filter_answers_are_parsed_and_nulls_counted(reviews: pd.DataFrame) -> None:
    class Chatty(RuleBackend):
        def _answer(self, r):  # type: ignore[no-untyped-def]
            return "Maybe." if "Odd" in r.prompt else super()._answer(r) + ", certainly"

    with llmsql.connect(backend=Chatty(constrained=False), progress=False) as con:
        con.register("reviews", reviews)
        res = con.sql("SELECT id, LLM_FILTER('Good?', review) AS f FROM reviews ORDER BY id")
    assert res.df()["f"].tolist()[:2] == [True, False]
    assert pd.isna(res.df()["f"].tolist()[5])
    assert res.stats.null_answers == 1


def test_unknown_column_in_field_is_a_plan_error(con: llmsql.Session) -> None:
    with pytest.raises(PlanError, match="reviw") as info:
        con.sql("SELECT LLM('Say', reviw) FROM reviews")
    assert info.value.line == 1


def test_unknown_placeholder_column_is_a_plan_error(con: llmsql.Session) -> None:
    with pytest.raises(PlanError, match="titel"):
        con.sql("SELECT LLM('Say {titel}', review) FROM reviews")


def test_unknown_table_is_a_plan_error(con: llmsql.Session) -> None:
    with pytest.raises(PlanError, match="nope"):
        con.sql("SELECT LLM('Say', review) FROM nope")


def test_prompt_longer_than_context_names_the_row(reviews: pd.DataFrame) -> None:
    long = pd.DataFrame({"id": [1], "review": ["word " * 400]})
    with llmsql.connect(backend=RuleBackend(max_model_len=200), progress=False) as con:
        con.register("long", long)
        with pytest.raises(ContextLengthError, match="truncate => true"):
            con.sql("SELECT LLM('Say', review) FROM long")
        res = con.sql("SELECT LLM('Say', review, truncate => true) AS s FROM long")
    assert res.stats.calls[0].truncated == 1
    assert 0 < len(res.df()["s"][0]) < 2000


def test_register_bad_path_and_format(dry: llmsql.Session, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="does not exist"):
        dry.register("x", tmp_path / "missing.parquet")
    bad = tmp_path / "x.txt"
    bad.write_text("a")
    with pytest.raises(ConfigError, match="format"):
        dry.register("x", bad)
    corrupt = tmp_path / "c.parquet"
    corrupt.write_text("not parquet")
    with pytest.raises(ConfigError, match="cannot read"):
        dry.register("x", corrupt)


def test_register_arrow_and_files(dry: llmsql.Session, reviews: pd.DataFrame, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import pyarrow as pa

    reviews.to_csv(tmp_path / "r.csv", index=False)
    dry.register("a", pa.Table.from_pandas(reviews)).register("c", tmp_path / "r.csv")
    assert dry.sql("SELECT COUNT(*) AS n FROM a JOIN c USING (id)").df()["n"][0] == 6


def test_explain_writes_prompts_in_send_order_without_a_model(dry: llmsql.Session,
                                                            tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "p.jsonl"
    e = dry.explain("SELECT id FROM reviews WHERE LLM_FILTER('Good?', genre, review)",
                    prompts=out)
    lines = out.read_text().splitlines()
    assert len(lines) == len(e.prompts) == 6
    assert "LLM_FILTER in WHERE" in e.text
    # prompts sharing their first field line (a prefix group) are sent next to each other
    firsts = [p.splitlines()[1] for p in e.prompts]
    assert firsts == sorted(firsts, key=firsts.index)
    assert len(set(firsts)) < len(firsts)


def test_import_is_light() -> None:
    import subprocess
    import sys

    code = "import llmsql, sys; print(any(m in sys.modules for m in ('torch', 'vllm', 'pyspark', 'transformers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_limit_without_order_stops_llm_filter_work_early(rule: RuleBackend) -> None:
    many = pd.DataFrame({"id": range(1000), "review": [f"Great {i}" for i in range(1000)]})
    with llmsql.connect(backend=rule, progress=False, batch_size=16) as con:
        con.register("many", many)
        res = con.sql("SELECT id, LLM('Say', review) AS s FROM many "
                      "WHERE LLM_FILTER('Good?', review) LIMIT 5")
    assert len(res) == 5
    assert all(s.startswith("GREAT") for s in res.df()["s"])
    filter_prompts = [p for p in rule.prompts if p.startswith("Good?")]
    assert len(filter_prompts) == 16  # one batch was enough
    assert "LIMIT reached" in " ".join(res.stats.calls[0].notes)
