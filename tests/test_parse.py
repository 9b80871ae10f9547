from __future__ import annotations

import pytest

from llmsql.dialect import LLMAgg, LLMClassify, LLMExtract, LLMFilter, LLMMap
from llmsql.errors import ParseError
from llmsql.parse import parse


@pytest.mark.parametrize(
    ("sql", "node"),
    [
        ("SELECT LLM('x', a) FROM t", LLMMap),
        ("SELECT llm_filter('x', a) FROM t", LLMFilter),
        ("SELECT Llm_Classify('x', labels => ['a', 'b'], a) FROM t", LLMClassify),
        ("SELECT LLM_EXTRACT('x', schema => 'a INT', a) FROM t", LLMExtract),
        ("SELECT LLM_AGG('x', a) FROM t", LLMAgg),
    ],
)
def test_llm_functions_parse_to_typed_nodes_case_insensitively(sql: str, node: type) -> None:
    (tree,) = parse(sql)
    assert isinstance(tree.find(node), node)


def test_syntax_error_has_line_and_column() -> None:
    with pytest.raises(ParseError) as info:
        parse("SELECT id,\n  LLM('x', a FROM t")
    assert info.value.line == 2
    assert info.value.col is not None
    assert "line 2" in str(info.value)


def test_unknown_llm_function_is_an_error_with_the_known_names() -> None:
    with pytest.raises(ParseError, match="LLM_FILTER") as info:
        parse("SELECT id FROM t WHERE LLM_FILTR('x', a)")
    assert info.value.line == 1


def test_empty_query_is_an_error() -> None:
    with pytest.raises(ParseError, match="empty"):
        parse("   ")


def test_unterminated_string_is_a_parse_error() -> None:
    with pytest.raises(ParseError):
        parse("SELECT LLM('x, a) FROM t")


def test_several_statements() -> None:
    assert len(parse("SELECT 1; SELECT LLM('x', a) FROM t")) == 2
