"""Each LLM function is one module of llmsql/udfs/ plus one dialect line (issue 14, item 3):
the registry, the dialect, the Python APIs and the README agree on the set of functions."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pyarrow as pa
import sqlglot

from llmsql import dataframe, spark_columns
from llmsql.dialect import LLM_FUNCS, LLMSQL, NODES
from llmsql.udfs import REGISTRY, SPECS, CallKind
from llmsql.udfs.base import CallOptions

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_module_spec_is_a_kind_and_a_dialect_node() -> None:
    assert set(SPECS) == {"LLM", "LLM_FILTER", "LLM_CLASSIFY", "LLM_EXTRACT", "LLM_AGG",
                          "LLM_SCORE"}
    assert {k.value for k in CallKind} == set(SPECS) == set(NODES)
    assert len(LLM_FUNCS) == len(SPECS)
    for kind in CallKind:
        spec = REGISTRY[kind]
        assert kind.spec is spec and spec.call_kind is kind
        node = sqlglot.parse_one(f"SELECT {spec.name.lower()}('q?', x) FROM t", read=LLMSQL)
        assert type(node.selects[0]) is NODES[spec.name] and node.selects[0].kind is kind
        assert isinstance(spec.arrow_type(CallOptions()), pa.DataType)
        # kinds and specs travel to Spark executors by name
        assert pickle.loads(pickle.dumps(kind)) is kind
        assert pickle.loads(pickle.dumps(spec)) is spec


def test_only_the_aggregate_is_an_aggregate_and_only_the_filter_a_predicate() -> None:
    assert [s.name for s in SPECS.values() if s.aggregate] == ["LLM_AGG"]
    assert [s.name for s in SPECS.values() if s.predicate] == ["LLM_FILTER"]
    assert all((s.reduce_prompt is not None) == s.aggregate for s in SPECS.values())


def test_every_function_has_a_readme_row_and_python_apis() -> None:
    rows = re.findall(r"^\| `([A-Z_]+)\(instruction, [^|]*\| ([A-Z]+) \|", README.read_text(),
                      re.MULTILINE)
    assert dict(rows) == {name: spec.sql_type for name, spec in SPECS.items()}
    for name in SPECS:
        if name != "LLM":
            assert callable(getattr(spark_columns, name.lower()))
            assert callable(getattr(dataframe.LLMFrame, name.lower().removeprefix("llm_")))
