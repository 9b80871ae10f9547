"""JSON grammars with a budget (llmsql.backends.grammar), on a tiny hand-made vocabulary."""

from __future__ import annotations

import json

import pytest

from llmsql.backends.grammar import UNREACHABLE, compile_schema, tightened_schema
from llmsql.errors import ConfigError

oc = pytest.importorskip("outlines_core")

EOS = 0
PIECES = ['{"', 'n', '":', "1", "2", "0", "}", '"', "a", "b", " ", ',"', "s", "{", ":", ","]
SCHEMA = json.dumps({
    "type": "object",
    "properties": {"n": {"type": "integer"}, "s": {"type": "string"}},
    "required": ["n", "s"],
})


@pytest.fixture(scope="module")
def grammar():  # type: ignore[no-untyped-def]
    vocab = oc.Vocabulary(EOS, {p.encode(): [i + 1] for i, p in enumerate(PIECES)})
    return compile_schema(SCHEMA, vocab, [EOS])


def ids(*pieces: str) -> list[int]:
    return [PIECES.index(p) + 1 for p in pieces]


def walk(grammar, tokens: list[int]) -> int:  # type: ignore[no-untyped-def]
    state = grammar.initial
    for t in tokens:
        nxt = grammar.next_state(state, t)
        assert nxt is not None, f"token {PIECES[t - 1]!r} refused"
        state = nxt
    return state


def test_shortest_answer_and_distances(grammar) -> None:  # type: ignore[no-untyped-def]
    shortest = ids('{"', "n", '":', "0", ',"', "s", '":', '"', '"', "}")
    assert grammar.min_tokens() == len(shortest)
    end = walk(grammar, shortest)
    assert grammar.is_final(end) and grammar.is_done(end)
    assert grammar.distance[end] == 0


def test_the_budget_closes_a_string_in_time(grammar) -> None:  # type: ignore[no-untyped-def]
    state = walk(grammar, ids('{"', "n", '":', "1", ',"', "s", '":', '"', "a"))
    assert set(grammar.allowed(state, 10)) >= set(ids("a", "b", '"'))
    # Two tokens left: only what ends the string now (a closing quote, maybe after a
    # character) still leaves room for the closing brace.
    assert set(grammar.allowed(state, 2)) == set(ids('"', '{"', ',"'))
    assert grammar.allowed(state, 1) == []


def test_digits_and_eos(grammar) -> None:  # type: ignore[no-untyped-def]
    state = walk(grammar, ids('{"', "n", '":'))
    allowed = set(grammar.allowed(state, 50))
    assert set(ids("1", "2", "0")) <= allowed and EOS not in allowed
    done = walk(grammar, ids('{"', "n", '":', "2", ',"', "s", '":', '"', "b", '"', "}"))
    assert grammar.allowed(done, 5) == [EOS]


def test_masks_are_cached_only_when_the_budget_does_not_bind(grammar) -> None:  # type: ignore[no-untyped-def]
    state = walk(grammar, ids('{"', "n", '":', "1", ',"', "s", '":', '"'))
    loose = grammar.mask(state, 50, len(PIECES) + 1, "cpu")
    tight = grammar.mask(state, 2, len(PIECES) + 1, "cpu")
    assert loose[ids("a")[0]] and not tight[ids("a")[0]] and tight[ids('"')[0]]
    assert grammar.mask(state, 50, len(PIECES) + 1, "cpu") is loose


def test_integers_are_bounded_and_order_is_kept() -> None:
    out = json.loads(tightened_schema(SCHEMA))
    assert out["properties"]["n"]["maxDigits"] == 18
    assert list(out["properties"]) == ["n", "s"]


def test_bad_schemas_say_how_to_fix() -> None:
    vocab = oc.Vocabulary(EOS, {b"a": [1]})
    with pytest.raises(ConfigError, match="not valid JSON"):
        compile_schema("{oops", vocab, [EOS])
    with pytest.raises(ConfigError, match="cannot be compiled"):
        compile_schema('{"type": "frobnicate"}', vocab, [EOS])


def test_an_unreachable_schema_has_no_shortest_answer() -> None:
    vocab = oc.Vocabulary(EOS, {b"x": [1]})  # no token can start a JSON object
    try:
        g = compile_schema(SCHEMA, vocab, [EOS])
    except ConfigError:
        return  # outlines_core refused it outright: also fine
    assert g.min_tokens() == UNREACHABLE
