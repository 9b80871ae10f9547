"""CREATE ADAPTER / SHOW ADAPTERS / DROP ADAPTER parsing (llmsql.adapters, no torch): the FOR
call is read exactly as the planner reads the same call in a query; the USING LORA options are
checked (names, types, ranges); the AS SELECT gives the call's fields plus one label."""

from __future__ import annotations

import subprocess
import sys

import pytest
import sqlglot

from llmsql.adapters import (
    OPTION_NAMES,
    CreateAdapter,
    DropAdapter,
    LoraOptions,
    ShowAdapters,
    is_adapter_statement,
    parse_adapter_statement,
)
from llmsql.dialect import LLMSQL
from llmsql.errors import LLMSQLError, ParseError, PlanError
from llmsql.parse import parse
from llmsql.planner import plan_query
from llmsql.udfs.base import SchemaField

FILTER = "LLM_FILTER('Is the review fresh?', review)"


def create(call: str = FILTER, using: str = "", tail: str = "AS SELECT review, fresh FROM t",
           ) -> CreateAdapter:
    stmt = parse_adapter_statement(f"CREATE ADAPTER a1 FOR {call} {using} {tail}")
    assert isinstance(stmt, CreateAdapter)
    return stmt


def test_create_full_statement() -> None:
    sql = ("create adapter Fresh_Reviews for LLM_FILTER('Is the review fresh?', title, review)\n"
           "  USING LORA (rank => 8, alpha => 16, target_modules => 'q_proj, k_proj,v_proj',\n"
           "              lr => 2e-4, epochs => 3, dropout => 0.05, batch_size => 4,\n"
           "              seed => 7, holdout => 0.2)\n"
           "  ASYNC AS SELECT title, review, fresh FROM rt WHERE split = 'train';")
    stmt = parse_adapter_statement(sql)
    assert stmt == CreateAdapter(
        name="fresh_reviews", call=stmt.call,
        lora=LoraOptions(rank=8, alpha=16.0, target_modules=("q_proj", "k_proj", "v_proj"),
                         lr=2e-4, epochs=3, dropout=0.05, batch_size=4, seed=7, holdout=0.2),
        source="SELECT title, review, fresh FROM rt WHERE split = 'train'", label="fresh",
        asynchronous=True)
    assert (stmt.call.kind, stmt.call.instruction, stmt.call.columns) == (
        "LLM_FILTER", "Is the review fresh?", ("title", "review"))
    assert isinstance(stmt.lora.rank, int) and isinstance(stmt.lora.alpha, float)


def test_defaults_without_using_and_async() -> None:
    stmt = create()
    assert stmt.lora == LoraOptions()
    assert (stmt.lora.rank, stmt.lora.alpha, stmt.lora.target_modules, stmt.lora.lr,
            stmt.lora.epochs) == (16, 32.0, ("q_proj", "v_proj"), 2e-4, 1)
    assert stmt.asynchronous is False and stmt.label == "fresh"


@pytest.mark.parametrize("call", [
    "LLM_FILTER('Is {title} a sequel?', review)",
    "LLM_CLASSIFY('Genre?', title, labels => ['drama', 'comedy'], max_tokens => 5, review)",
    "LLM('Summarize', review, title, temperature => 0.5, seed => 3)",
    "LLM_EXTRACT('Facts', title, review, schema => 'year INTEGER, director VARCHAR')",
])
def test_for_call_matches_the_planner(call: str) -> None:
    """Training must render what inference renders: same instruction, fields, options."""
    stmt = create(call, tail="AS SELECT review, title, y FROM t")
    planned = plan_query("q", parse(f"SELECT {call} FROM t")[0]).calls[0]
    assert stmt.call.kind == planned.kind.value
    assert stmt.call.instruction == planned.template.instruction
    assert stmt.call.columns == tuple(f.name for f in planned.fields)
    assert stmt.call.options == planned.options
    assert sqlglot.parse_one(f"SELECT {stmt.call.text}", read=LLMSQL).selects[0].sql(
        dialect=LLMSQL) == stmt.call.text


def test_call_options_are_kept() -> None:
    stmt = create("LLM_EXTRACT('Facts', review, schema => 'year INTEGER')",
                  tail="AS SELECT review, facts FROM t")
    assert stmt.call.options.schema == (SchemaField("year", "INTEGER"),)
    cls = create("LLM_CLASSIFY('Genre?', review, labels => ['a', 'b'])")
    assert cls.call.options.labels == ("a", "b")


def test_show_and_drop() -> None:
    assert parse_adapter_statement("SHOW ADAPTERS") == ShowAdapters()
    assert parse_adapter_statement("  show adapters ;") == ShowAdapters()
    assert parse_adapter_statement("DROP ADAPTER Fresh") == DropAdapter("fresh", False)
    assert parse_adapter_statement('DROP ADAPTER IF EXISTS "Fresh"') == DropAdapter("Fresh", True)


@pytest.mark.parametrize("sql", ["SELECT 1", "CREATE TABLE t (a INT)", "SET llmsql.x = 1",
                                 "DROP TABLE t", "SHOW TABLES"])
def test_other_statements_are_not_adapter_statements(sql: str) -> None:
    assert parse_adapter_statement(sql) is None
    assert not is_adapter_statement(sql)


def test_is_adapter_statement() -> None:
    assert is_adapter_statement("create  adapter x FOR ...")
    assert is_adapter_statement("SHOW ADAPTERS;")
    assert is_adapter_statement("\n DROP ADAPTER x")


@pytest.mark.parametrize(("options", "words"), [
    ("rank => 0", ["'rank'", "from 1 to 256", "got 0"]),
    ("rank => 257", ["'rank'", "from 1 to 256"]),
    ("rank => 16.5", ["'rank'", "integer"]),
    ("rank => 'big'", ["'rank'", "integer"]),
    ("alpha => 0", ["'alpha'", "> 0"]),
    ("alpha => -4", ["'alpha'", "> 0"]),
    ("lr => 0", ["'lr'", "between 0 and 1"]),
    ("lr => 1.5", ["'lr'", "between 0 and 1"]),
    ("lr => -1e-4", ["'lr'"]),
    ("epochs => 0", ["'epochs'", "from 1 to 100"]),
    ("epochs => 101", ["'epochs'", "from 1 to 100"]),
    ("target_modules => ''", ["'target_modules'", "non-empty"]),
    ("target_modules => 'q_proj,,v_proj'", ["'target_modules'"]),
    ("target_modules => 3", ["'target_modules'"]),
    ("dropout => 1", ["'dropout'"]),
    ("holdout => 1.0", ["'holdout'"]),
    ("batch_size => 0", ["'batch_size'"]),
    ("ranks => 16", ["unknown USING LORA option 'ranks'", *OPTION_NAMES]),
    ("rank => 8, rank => 16", ["'rank'", "twice"]),
    ("rank => 8, lr => (SELECT 1)", ["'lr'", "constant"]),
])
def test_options_out_of_range_are_plan_errors(options: str, words: list[str]) -> None:
    with pytest.raises(PlanError) as err:
        create(using=f"USING LORA ({options})")
    for word in words:
        assert word in str(err.value)
    assert isinstance(err.value, ValueError) and isinstance(err.value, LLMSQLError)


@pytest.mark.parametrize(("tail", "words"), [
    ("AS SELECT review FROM t", ["no label column", "SELECT review, label"]),
    ("AS SELECT title, fresh FROM t", ["lacks the call's field(s) review"]),
    ("AS SELECT review, fresh, extra FROM t", ["several columns", "fresh, extra"]),
    ("AS SELECT * FROM t", ["must name its columns"]),
    ("AS SELECT review, upper(title) FROM t", ["must name its columns"]),
])
def test_source_columns(tail: str, words: list[str]) -> None:
    with pytest.raises(PlanError) as err:
        create(tail=tail)
    for word in words:
        assert word in str(err.value)


def test_source_label_may_be_an_aliased_expression() -> None:
    stmt = create(tail="AS SELECT review, score > 60 AS fresh FROM t WHERE id % 5 <> 0")
    assert stmt.label == "fresh"
    assert stmt.source == "SELECT review, score > 60 AS fresh FROM t WHERE id % 5 <> 0"


@pytest.mark.parametrize(("sql", "words"), [
    ("CREATE ADAPTER", ["an adapter name", "the end of the statement"]),
    ("CREATE ADAPTER a1 " + FILTER, ["expected FOR"]),
    ("CREATE ADAPTER a1 FOR LLM_FILTER", ["'('"]),
    ("CREATE ADAPTER a1 FOR LLM_FILTER('x', review", ["')'"]),
    (f"CREATE ADAPTER a1 FOR {FILTER} SELECT review, y FROM t", ["AS SELECT"]),
    (f"CREATE ADAPTER a1 FOR {FILTER} AS", ["AS SELECT"]),
    (f"CREATE ADAPTER a1 FOR {FILTER} USING QLORA (rank => 4) AS SELECT 1", ["LORA"]),
    (f"CREATE ADAPTER a1 FOR {FILTER} USING LORA (16) AS SELECT review, y FROM t",
     ["name => value"]),
    (f"CREATE ADAPTER a1 FOR {FILTER} AS SELECT review, y FROM t; SELECT 2", ["one SELECT"]),
    (f"CREATE ADAPTER a1 FOR {FILTER} AS SELEC review FROM t", ["syntax"]),
    ("CREATE ADAPTER 1abc FOR x", ["an adapter name"]),
    ('CREATE ADAPTER "no-dash" FOR x', ["not allowed"]),
    ("DROP ADAPTER", ["an adapter name"]),
    ("DROP ADAPTER IF x", ["EXISTS"]),
    ("DROP ADAPTER a b", ["the end of the statement"]),
    ("SHOW ADAPTERS now", ["the end of the statement"]),
    ("CREATE ADAPTER a1 FOR LLM_FILTER('unterminated", ["unterminated"]),
])
def test_malformed_statements_are_parse_errors(sql: str, words: list[str]) -> None:
    with pytest.raises(ParseError) as err:
        parse_adapter_statement(sql)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize(("call", "words"), [
    ("LLM_AGG('Sum up', review)", ["LLM_FILTER, LLM_CLASSIFY, LLM, LLM_EXTRACT"]),
    ("LLM_SCORE('Good?', review)", ["LLM_FILTER, LLM_CLASSIFY, LLM, LLM_EXTRACT"]),
    ("UPPER(review)", ["an adapter is trained for one call"]),
    ("LLM_FILTER(review)", ["instruction as a string literal"]),
    ("LLM_FILTER('x', review, temprature => 0)", ["unknown option 'temprature'"]),
    ("LLM_CLASSIFY('x', review)", ["labels"]),
    ("LLM_FILTER('x', upper(review))", ["is an expression", "alias"]),
])
def test_bad_for_calls(call: str, words: list[str]) -> None:
    with pytest.raises(PlanError) as err:
        create(call)
    for word in words:
        assert word in str(err.value)


def test_misspelled_llm_function_in_for_is_a_parse_error() -> None:
    with pytest.raises(ParseError, match="LLM_FILTR"):
        create("LLM_FILTR('x', review)")


def test_the_package_stays_torch_free() -> None:
    code = ("import sys, llmsql.adapters; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'vllm', 'pyspark')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
