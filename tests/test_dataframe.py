"""The DataFrame API (``df.llm``, ``llmsql.frame``, ``llmsql.sql``) against the SQL path.

Answers come from the deterministic rule function (tests/answers.py), so every accessor call
can be compared with the equivalent hand-written SQL on the same data, including the exact
prompts sent; one test repeats the comparison on the real embedded model.
"""

from __future__ import annotations

import pandas as pd
import polars as pl
import pyarrow as pa
import pytest

import llmsql
from llmsql.errors import ConfigError, PlanError, UnsupportedError
from tests.answers import RuleBackend


@pytest.fixture
def con(rule: RuleBackend, reviews: pd.DataFrame):  # type: ignore[no-untyped-def]
    s = llmsql.connect(backend=rule, progress=False)
    s.register("reviews", reviews)
    yield s
    s.close()


@pytest.fixture
def df(reviews: pd.DataFrame) -> pd.DataFrame:
    """``reviews`` with a non-default index (it must survive every operator)."""
    return reviews.set_axis([f"r{i}" for i in range(len(reviews))])


def sql_rows(con: llmsql.Session, query: str) -> list[tuple]:
    return [tuple(r) for r in con.sql(query).df().itertuples(index=False)]


def frame_rows(frame: pd.DataFrame, cols: list[str]) -> list[tuple]:
    return [tuple(r) for r in frame[cols].itertuples(index=False)]


# ---- same results as SQL --------------------------------------------------------------------


def test_filter_matches_sql(con: llmsql.Session, df: pd.DataFrame) -> None:
    got = df.llm.filter("Good?", "review", session=con)
    want = sql_rows(con, "SELECT * FROM reviews WHERE LLM_FILTER('Good?', review) ORDER BY id")
    assert frame_rows(got, list(df.columns)) == want
    assert list(got.index) == ["r0", "r3"]  # original index and order kept
    assert got.dtypes.equals(df.dtypes)


def test_map_matches_sql_and_sends_the_same_prompts(df: pd.DataFrame) -> None:
    prompts = []
    for use_accessor in (True, False):
        rule = RuleBackend()
        with llmsql.connect(backend=rule, progress=False) as con:
            if use_accessor:
                got = df.llm.map("Say", "movie", "review", session=con)["answer"].tolist()
            else:
                con.register("reviews", df)
                want = [r[0] for r in sql_rows(con, "SELECT LLM('Say', movie, review) AS a "
                                                    "FROM reviews ORDER BY id")]
        prompts.append(rule.prompts)
    assert got == want
    assert prompts[0] == prompts[1]  # same plan, same optimizer: same prompts in same order
    assert len(prompts[0]) == 6


def test_map_sends_each_distinct_input_once(con: llmsql.Session, rule: RuleBackend,
                                            df: pd.DataFrame) -> None:
    out = df.llm.map("Say", "review", column="said", session=con)
    assert out["said"].tolist()[0] == out["said"].tolist()[3] == "GREAT FUN"
    assert len(rule.prompts) == 5  # 6 rows, 'Great fun' twice: not a per-row loop
    assert list(out.columns) == [*df.columns, "said"]
    assert list(out.index) == list(df.index)


def test_classify_matches_sql(con: llmsql.Session, df: pd.DataFrame) -> None:
    got = df.llm.classify("Kind", "review", labels=["long", "short"], session=con)
    want = sql_rows(con, "SELECT LLM_CLASSIFY('Kind', labels => ['long', 'short'], review) "
                         "FROM reviews ORDER BY id")
    assert [(x,) for x in got["label"]] == want


def test_extract_expands_fields_like_sql(con: llmsql.Session, df: pd.DataFrame) -> None:
    got = df.llm.extract("Extract json", "review", schema={"word": "VARCHAR", "n": "INTEGER"},
                         session=con)
    want = sql_rows(con, "SELECT e.word, e.n FROM (SELECT id, LLM_EXTRACT('Extract json', "
                         "schema => 'word VARCHAR, n INTEGER', review) AS e FROM reviews) "
                         "ORDER BY id")
    assert frame_rows(got, ["word", "n"]) == want
    one = df.llm.extract("Extract json", "review", schema="word VARCHAR, n INTEGER",
                         column="facts", session=con)
    assert one["facts"].iloc[0] == {"word": "Great", "n": 9}


def test_agg_by_matches_sql_group_by(con: llmsql.Session, df: pd.DataFrame) -> None:
    got = df.llm.agg("Count the reviews", "review", by="movie", session=con)
    want = sql_rows(con, "SELECT movie, LLM_AGG('Count the reviews', review) FROM reviews "
                         "WHERE movie IS NOT NULL GROUP BY movie ORDER BY movie")
    assert list(got.reset_index().itertuples(index=False, name=None)) == want
    assert got.index.name == "movie"
    assert list(got.columns) == ["answer"]


def test_groupby_accessor_follows_groupby_options(con: llmsql.Session, df: pd.DataFrame) -> None:
    got = df.groupby("movie").llm.agg("Count the reviews", "review", session=con)
    assert got["answer"].to_dict() == {"Heat": "3", "Up": "2"}
    kept = df.groupby("movie", sort=False, dropna=False, as_index=False).llm.agg(
        "Count the reviews", "review", column="n", session=con)
    # The NULL key is pandas' own missing string, as pandas itself builds it from None: None
    # in pandas 2's object dtype, NaN in pandas 3's default str dtype (the frame's own dtype).
    want = pd.DataFrame({"movie": ["Up", "Heat", None], "n": ["2", "3", "1"]})
    pd.testing.assert_frame_equal(kept, want)
    assert repr(kept.values.tolist()) == repr(want.values.tolist())  # None is not NaN here
    assert kept["movie"].dtype == df["movie"].dtype


def test_agg_over_the_whole_frame_is_one_answer(con: llmsql.Session, df: pd.DataFrame) -> None:
    assert df.llm.agg("Count the reviews", "review", session=con) == "6"


def test_placeholder_columns_are_sent(con: llmsql.Session, rule: RuleBackend,
                                      df: pd.DataFrame) -> None:
    got = df.llm.filter("Is {movie} good?", "review", session=con)
    want = sql_rows(con, "SELECT id FROM reviews WHERE LLM_FILTER('Is {movie} good?', review) "
                         "ORDER BY id")
    assert [(i,) for i in got["id"]] == want
    assert any(p.startswith("Is Heat good?") for p in rule.prompts)


def test_names_and_values_are_quoted_not_spliced(con: llmsql.Session, rule: RuleBackend) -> None:
    evil = "x'); DROP TABLE reviews; --"
    frame = pd.DataFrame({'my "odd" col': [evil], "id": [1]})
    out = frame.llm.map(f"Say {evil}", 'my "odd" col', session=con)
    assert rule.prompts == [f"Say {evil}\nmy \"odd\" col: {evil}\n"]
    assert out["answer"].tolist() == [evil.upper()]
    assert con.sql("SELECT COUNT(*) AS n FROM reviews").df()["n"][0] == 6


def test_options_reach_the_backend(con: llmsql.Session, df: pd.DataFrame) -> None:
    sent = []

    class Recording(RuleBackend):
        def generate(self, batch):  # type: ignore[no-untyped-def]
            sent.extend(batch)
            return super().generate(batch)

    with llmsql.connect(backend=Recording(), progress=False) as s:
        df.head(1).llm.map("Say", "review", max_tokens=7, temperature=0.5, seed=3, session=s)
    assert (sent[0].max_tokens, sent[0].temperature, sent[0].seed) == (7, 0.5, 3)


# ---- frames in and out -------------------------------------------------------------------------


def test_polars_in_polars_out(con: llmsql.Session, df: pd.DataFrame) -> None:
    pdf = pl.from_pandas(df.reset_index(drop=True))
    kept = llmsql.frame(pdf, session=con).filter("Good?", "review")
    assert isinstance(kept, pl.DataFrame)
    assert kept["id"].to_list() == [1, 4]
    mapped = llmsql.frame(pdf, session=con).classify("Kind", "review", labels=["long", "short"])
    assert mapped["label"].to_list() == df.llm.classify("Kind", "review", labels=["long", "short"],
                                                        session=con)["label"].tolist()
    grouped = llmsql.frame(pdf, session=con).agg("Count the reviews", "review", by="movie")
    assert grouped.rows() == [("Heat", "3"), ("Up", "2")]
    kept = llmsql.frame(pdf, session=con).agg("Count the reviews", "review", by="movie",
                                              sort=False, dropna=False)
    assert kept.rows() == [("Up", "2"), ("Heat", "3"), (None, "1")]  # NULL is polars' null
    assert kept.schema == pl.Schema({"movie": pl.String, "answer": pl.String})


def test_arrow_null_group_key_is_null(con: llmsql.Session, df: pd.DataFrame) -> None:
    table = pa.Table.from_pandas(df, preserve_index=False)
    kept = llmsql.frame(table, session=con).agg("Count the reviews", "review", by="movie",
                                                sort=False, dropna=False)
    assert kept.to_pylist() == [{"movie": "Up", "answer": "2"}, {"movie": "Heat", "answer": "3"},
                                {"movie": None, "answer": "1"}]


def test_pandas_columns_are_typed_as_in_sql_results(con: llmsql.Session,
                                                    df: pd.DataFrame) -> None:
    # Fields the answers lack are NULL: an INTEGER is pandas' nullable Int64 and a BOOLEAN
    # its nullable boolean (<NA>), as in DuckDB's own .df() and Session.sql(...).df(), not
    # float64 NaN or None objects (pyarrow's to_pandas).
    schema = {"word": "VARCHAR", "n": "INTEGER", "lacking": "INTEGER", "flag": "BOOLEAN"}
    got = df.llm.extract("Extract json", "review", schema=schema, session=con)
    want = con.sql("SELECT e.* FROM (SELECT id, LLM_EXTRACT('Extract json', schema => "
                   "'word VARCHAR, n INTEGER, lacking INTEGER, flag BOOLEAN', review) AS e "
                   "FROM reviews) ORDER BY id").df().set_axis(df.index)
    pd.testing.assert_frame_equal(got[list(schema)], want)
    assert [str(got[c].dtype) for c in ("lacking", "flag")] == ["Int64", "boolean"]
    assert got["lacking"].isna().all() and got["flag"].isna().all()


def test_polars_namespace(con: llmsql.Session, df: pd.DataFrame) -> None:
    from llmsql.dataframe import register_polars_namespace

    register_polars_namespace()
    pdf = pl.from_pandas(df.reset_index(drop=True))
    assert pdf.llm.filter("Good?", "review", session=con)["id"].to_list() == [1, 4]


def _fresh_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter (nothing imported yet); return its stdout."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    return out.stdout.strip()


def test_import_llmsql_leaves_pandas_and_polars_unimported() -> None:
    # pandas alone took 0.54 s of a 0.61 s import (issue 12, item 3)
    code = ("import llmsql, sys; print(sorted(m for m in ('pandas', 'polars', 'torch', "
            "'vllm', 'pyspark') if m in sys.modules))")
    assert _fresh_python(code) == "[]"


def test_accessors_registered_when_pandas_or_polars_is_imported_after_llmsql() -> None:
    code = """
import llmsql, sys
assert "pandas" not in sys.modules and "polars" not in sys.modules
import pandas as pd
import polars as pl
con = llmsql.connect(dry_run=True, progress=False)
df = pd.DataFrame({"id": [1, 2], "g": ["a", "b"], "review": ["great", "bad"]})
print(df.llm.filter("Good?", "review", session=con)["id"].tolist())
print(df.groupby("g").llm.agg("Sum up.", "review", session=con).index.tolist())
print(pl.from_pandas(df).llm.map("Say", "review", session=con).columns)
con.close()
"""
    assert _fresh_python(code).splitlines() == [
        "[1, 2]", "['a', 'b']", "['id', 'g', 'review', 'answer']"]


def test_explain_of_a_table_file_imports_no_pandas(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # pyarrow imports pandas the first time it converts Python or numpy values (pa.array,
    # to_numpy) or groups a table; the optimizer and the LLM step avoid all three, so
    # `llmsql explain` (W2: 28,479 rows) does not pay 0.2 s for it
    table = tmp_path / "t.csv"
    table.write_text("id,g,review\n1,a,great\n2,a,bad\n3,b,great\n")
    code = f"""
import sys
from llmsql.cli import main
code = main(["explain", "-t", "t={table}", "--prompts", "{tmp_path / 'p.jsonl'}",
             "-e", "SELECT id FROM t WHERE LLM_FILTER('Good?', g, review)"])
print(code, sorted(m for m in ("pandas", "pyarrow.dataset") if m in sys.modules))
"""
    assert _fresh_python(code).splitlines()[-1] == "0 []"


def test_accessor_registered_when_pandas_is_imported_first() -> None:
    code = ("import pandas as pd, llmsql; from pandas.core.groupby import DataFrameGroupBy; "
            "print(hasattr(pd.DataFrame, 'llm'), hasattr(DataFrameGroupBy, 'llm'))")
    assert _fresh_python(code) == "True True"


def test_arrow_in_arrow_out_keeps_the_input_buffers(con: llmsql.Session,
                                                    df: pd.DataFrame) -> None:
    table = pa.Table.from_pandas(df, preserve_index=False)
    out = llmsql.frame(table, session=con).map("Say", "review")
    assert isinstance(out, pa.Table)
    assert out.column_names == [*table.column_names, "answer"]
    before = table.column("review").chunk(0).buffers()
    after = out.column("review").chunk(0).buffers()
    assert [b.address for b in before if b] == [b.address for b in after if b]  # no copy
    assert out.column("answer").to_pylist()[0] == "GREAT FUN"


def test_sql_over_frames_by_name(con: llmsql.Session, df: pd.DataFrame) -> None:
    query = ("SELECT r.id, m.year FROM r JOIN m USING (movie) WHERE LLM_FILTER('Good?', review) "
             "ORDER BY r.id")
    movies = pl.DataFrame({"movie": ["Up", "Heat"], "year": [2009, 1995]})
    got = llmsql.sql(query, session=con, r=pa.Table.from_pandas(df), m=movies)
    assert got.arrow().to_pylist() == [{"id": 1, "year": 2009}, {"id": 4, "year": 1995}]
    with pytest.raises(PlanError, match="r"):  # the frames were visible to that query only
        con.sql("SELECT * FROM r")


def test_sql_refuses_to_shadow_a_registered_frame(con: llmsql.Session, df: pd.DataFrame) -> None:
    with pytest.raises(ConfigError, match="already registered"):
        llmsql.sql("SELECT 1", session=con, reviews=df)
    with pytest.raises(ConfigError, match="Session"):
        llmsql.sql("SELECT 1", session=df)  # type: ignore[arg-type]


def test_no_temporary_tables_are_left_behind(con: llmsql.Session, df: pd.DataFrame) -> None:
    df.llm.filter("Good?", "review", session=con)
    with pytest.raises(PlanError):
        df.llm.classify("Kind", "review", labels=["only one"], session=con)
    views = con.duckdb.sql("SELECT view_name FROM duckdb_views() WHERE temporary").fetchall()
    assert [v for (v,) in views if v.startswith("__llmsql")] == []


def test_default_session(con: llmsql.Session, rule: RuleBackend, df: pd.DataFrame) -> None:
    llmsql.set_default_session(con)
    try:
        assert llmsql.default_session() is con
        assert df.llm.filter("Good?", "review")["id"].tolist() == [1, 4]
        assert rule.prompts
    finally:
        llmsql.set_default_session(None)


def test_empty_frame(con: llmsql.Session, df: pd.DataFrame) -> None:
    assert df.head(0).llm.map("Say", "review", session=con)["answer"].tolist() == []
    assert len(df.head(0).llm.filter("Good?", "review", session=con)) == 0


# ---- errors ------------------------------------------------------------------------------


def test_unknown_column_names_the_frame_columns(con: llmsql.Session, df: pd.DataFrame) -> None:
    with pytest.raises(PlanError, match=r"unknown column 'reviw'.*did you mean 'review'"):
        df.llm.filter("Good?", "reviw", session=con)
    with pytest.raises(PlanError, match="titel"):
        df.llm.map("Say {titel}", "review", session=con)
    with pytest.raises(PlanError, match="unknown column 'gnere'"):
        df.llm.agg("Count", "review", by=["gnere"], session=con)


def test_bad_labels_schema_and_options(con: llmsql.Session, df: pd.DataFrame) -> None:
    with pytest.raises(PlanError, match="list of strings"):
        df.llm.classify("Kind", "review", labels="long,short", session=con)
    with pytest.raises(PlanError, match=r"llm\.classify\(\).*at least two"):
        df.llm.classify("Kind", "review", labels=["long"], session=con)
    with pytest.raises(PlanError, match="unsupported type"):
        df.llm.extract("Get", "review", schema={"n": "COMPLEX"}, session=con)
    with pytest.raises(PlanError, match="max_tokens"):
        df.llm.map("Say", "review", max_tokens=0, session=con)
    with pytest.raises(PlanError, match="instruction"):
        df.llm.map("", "review", session=con)


def test_not_a_frame_and_unsupported_groupings(con: llmsql.Session, df: pd.DataFrame) -> None:
    with pytest.raises(ConfigError, match="expected a pandas DataFrame"):
        llmsql.frame([1, 2, 3])
    with pytest.raises(ConfigError, match=r"collect\(\)"):
        llmsql.frame(pl.from_pandas(df).lazy())
    with pytest.raises(UnsupportedError, match="by=\\['key'\\]"):
        df.groupby(df["stars"] > 3).llm.agg("Count", "review", session=con)


# ---- the real model ------------------------------------------------------------------------


@pytest.mark.model
def test_real_model_accessor_matches_sql(model_session: llmsql.Session) -> None:
    frame = pd.DataFrame({"id": [1, 2, 3], "review": ["I loved it, wonderful film.",
                                                      "Boring and far too long.",
                                                      "A wonderful, moving story."]})
    kept = frame.llm.filter("Is the review positive?", "review", session=model_session)
    labels = frame.llm.classify("Sentiment of the review?", "review",
                                labels=["positive", "negative"], session=model_session)
    with llmsql.frames.registered(model_session, {"rv": frame}):
        want_ids = model_session.sql("SELECT id FROM rv WHERE LLM_FILTER("
                                     "'Is the review positive?', review) ORDER BY id").df()
        want_labels = model_session.sql(
            "SELECT LLM_CLASSIFY('Sentiment of the review?', labels => ['positive', "
            "'negative'], review) AS label FROM rv ORDER BY id").df()
    assert kept["id"].tolist() == want_ids["id"].tolist()
    assert labels["label"].tolist() == want_labels["label"].tolist()
    assert set(labels["label"]) <= {"positive", "negative"}


# ---- the answer column's name never clashes with the frame's columns -------------------------


@pytest.fixture
def quiz() -> pd.DataFrame:
    """A frame with a data column named ``answer``: the agg default must not take its name."""
    return pd.DataFrame({"answer": ["Paris", "Paris", "Rome"],
                         "review": ["Great fun", "Dull", "Great"]})


def test_groupby_agg_default_name_avoids_an_answer_column(con: llmsql.Session,
                                                          quiz: pd.DataFrame) -> None:
    got = quiz.groupby("answer").llm.agg("Count the reviews", "review", session=con)
    assert got.index.name == "answer" and list(got.columns) == ["answer_1"]
    assert got["answer_1"].to_dict() == {"Paris": "2", "Rome": "1"}
    flat = quiz.groupby("answer", as_index=False).llm.agg("Count the reviews", "review",
                                                          session=con)
    assert list(flat.columns) == ["answer", "answer_1"]
    taken = quiz.assign(answer_1=0).llm.agg("Count", "review", by="answer", session=con)
    assert list(taken.columns) == ["answer_2"]


def test_agg_column_naming_a_group_key_is_a_plan_error(con: llmsql.Session,
                                                       quiz: pd.DataFrame) -> None:
    with pytest.raises(PlanError, match=r"'answer' is also a group key.*column="):
        quiz.groupby("answer").llm.agg("Count", "review", column="answer", session=con)
