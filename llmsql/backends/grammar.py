"""JSON-schema constrained decoding for in-process engines, on ``outlines_core``.

A JSON schema becomes a regular expression (``outlines_core.json_schema``), the regular
expression becomes a token-level automaton over the model's vocabulary (``outlines_core.Index``),
and decoding masks every token that would leave the automaton. Two things are added on top:

* **The budget is part of the grammar.** Every state knows the fewest tokens that reach an
  accepting state (:attr:`TokenGrammar.distance`). With ``r`` tokens left, a token is allowed
  only if its next state can still accept within ``r - 1``; so an answer that runs out of
  ``max_tokens`` is closed in time and always parses (a long string is cut short, but the
  JSON is whole). A request whose budget cannot hold even the shortest valid answer is
  refused before it runs (:meth:`TokenGrammar.min_tokens`).
* **Bounded numbers.** Integers get at most 18 digits (they must fit a 64-bit column), and
  whitespace between tokens is at most one space (small models otherwise loop on blanks).

Why ``outlines_core``: it is maintained (by the Outlines authors, and vLLM ships it as a
structured-output backend), it is a 5 MB wheel with no dependencies, and its automaton
exposes what budget-aware masking needs (states, transitions, accepting states). xgrammar
(vLLM's default) would pull triton (about 1 GB) into the CPU install; lm-format-enforcer
walks a character tree in Python for every token.

Only this module imports ``outlines_core``, and only inside functions.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmsql.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

WHITESPACE = r"[ ]?"
"""Whitespace allowed between JSON tokens: at most one space."""

MAX_INTEGER_DIGITS = 18
"""Digits allowed in a JSON integer: every 18-digit integer fits a signed 64-bit column."""

UNREACHABLE = 1 << 30


def tightened_schema(schema: str, /) -> str:
    """Return ``schema`` with integers bounded to :data:`MAX_INTEGER_DIGITS` digits.

    >>> tightened_schema('{"type": "object", "properties": {"n": {"type": "integer"}}}')
    '{"type": "object", "properties": {"n": {"type": "integer", "maxDigits": 18}}}'
    """
    try:
        doc = json.loads(schema)
    except json.JSONDecodeError as exc:
        msg = f"the JSON schema is not valid JSON ({exc}); pass a JSON schema string"
        raise ConfigError(msg) from exc
    return json.dumps(_tighten(doc))


def _tighten(node: Any) -> Any:
    if isinstance(node, list):
        return [_tighten(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _tighten(v) for k, v in node.items()}
    if out.get("type") == "integer" and "maxDigits" not in out:
        out["maxDigits"] = MAX_INTEGER_DIGITS
    return out


def token_bytes(tokenizer: Any, /) -> dict[bytes, list[int]]:
    """Map every ordinary token's bytes to its ids (special tokens left out).

    Handles byte-level BPE vocabularies (GPT-2 style, as SmolLM2 and Llama 3 use) and
    SentencePiece ones (``▁`` for a space, ``<0xNN>`` for a raw byte).
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    unicode_to_byte = {v: k for k, v in bytes_to_unicode().items()}
    special = set(getattr(tokenizer, "all_special_ids", ()))
    out: dict[bytes, list[int]] = {}
    for token, idx in tokenizer.get_vocab().items():
        if idx in special:
            continue
        raw = _bytes_of(token, unicode_to_byte)
        if raw:
            out.setdefault(raw, []).append(idx)
    return out


def _bytes_of(token: str, unicode_to_byte: Mapping[str, int]) -> bytes:
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            pass
    if "\u2581" in token:  # SentencePiece
        return token.replace("\u2581", " ").encode("utf-8")
    if all(c in unicode_to_byte for c in token):  # byte-level BPE
        return bytes(unicode_to_byte[c] for c in token)
    return token.encode("utf-8")


@dataclass(slots=True)
class TokenGrammar:
    """A token automaton for one JSON schema, with each state's distance to acceptance.

    Build with :func:`compile_schema`. States are the automaton's integers; ``transitions``
    maps a state to ``{token id: next state}``.
    """

    initial: int
    transitions: Mapping[int, Mapping[int, int]]
    finals: frozenset[int]
    distance: Mapping[int, int]
    """Fewest tokens from a state to an accepting state (0 for an accepting state)."""
    eos: tuple[int, ...]
    _masks: dict[int, Any] = field(default_factory=dict)

    def min_tokens(self) -> int:
        """Tokens in the shortest valid answer."""
        return self.distance.get(self.initial, UNREACHABLE)

    def is_final(self, state: int) -> bool:
        """Whether ``state`` accepts (the answer may end here)."""
        return state in self.finals

    def is_done(self, state: int) -> bool:
        """Whether the answer must end at ``state``: it accepts and nothing may follow."""
        return state in self.finals and not self.transitions.get(state)

    def next_state(self, state: int, token: int) -> int | None:
        """The state after ``token``, or None for a stop token (or a token not allowed)."""
        return self.transitions.get(state, {}).get(token)

    def allowed(self, state: int, left: int) -> list[int]:
        """Tokens allowed at ``state`` when ``left`` tokens remain (this one included)."""
        keep = [t for t, s in self.transitions.get(state, {}).items()
                if self.distance.get(s, UNREACHABLE) <= left - 1]
        if state in self.finals:
            keep.extend(self.eos)
        return keep

    def mask(self, state: int, left: int, vocab: int, device: str) -> Any:
        """A boolean (vocab,) tensor of the tokens allowed at ``state`` with ``left`` to go.

        The unrestricted mask of each state is cached; a budget-restricted one is built
        only in the last few tokens of an answer.
        """
        import torch

        edges = self.transitions.get(state, {})
        tight = any(self.distance.get(s, UNREACHABLE) > left - 1 for s in edges.values())
        if not tight and state in self._masks:
            return self._masks[state]
        allowed = torch.zeros(vocab, dtype=torch.bool, device=device)
        ids = [t for t in self.allowed(state, left) if t < vocab]
        if ids:
            allowed[torch.tensor(ids, dtype=torch.long, device=device)] = True
        if not tight:
            self._masks[state] = allowed
        return allowed


def compile_schema(schema: str, vocabulary: Any, eos: Sequence[int]) -> TokenGrammar:
    """Compile a JSON schema into a :class:`TokenGrammar` over an ``outlines_core.Vocabulary``.

    Raises:
        ConfigError: the schema is not valid JSON or not a schema outlines_core supports.
    """
    import outlines_core as oc

    try:
        regex = oc.json_schema.build_regex_from_schema(tightened_schema(schema), WHITESPACE)
        index = oc.Index(regex, vocabulary)
    except ConfigError:
        raise
    except Exception as exc:  # boundary: outlines_core raises plain exceptions
        msg = (
            f"the JSON schema {schema[:80]!r} cannot be compiled into a grammar ({exc}); "
            "use object, string, integer, number and boolean properties"
        )
        raise ConfigError(msg) from exc
    stops = set(eos)  # the automaton loops on EOS in accepting states; stops are ours to handle
    transitions = {
        s: {t: nxt for t, nxt in edges.items() if t not in stops}
        for s, edges in index.get_transitions().items()
    }
    finals = frozenset(index.get_final_states())
    return TokenGrammar(
        initial=index.get_initial_state(),
        transitions=transitions,
        finals=finals,
        distance=_distances(transitions, finals),
        eos=tuple(eos),
    )


def _distances(transitions: Mapping[int, Mapping[int, int]],
               finals: frozenset[int]) -> dict[int, int]:
    """Breadth-first search backwards from the accepting states."""
    back: dict[int, set[int]] = {}
    for s, edges in transitions.items():
        for nxt in edges.values():
            back.setdefault(nxt, set()).add(s)
    dist = dict.fromkeys(finals, 0)
    queue = deque(finals)
    while queue:
        s = queue.popleft()
        for prev in back.get(s, ()):
            if prev not in dist:
                dist[prev] = dist[s] + 1
                queue.append(prev)
    return dist


def vocabulary(tokenizer: Any, eos: int) -> Any:
    """The ``outlines_core.Vocabulary`` of a transformers tokenizer."""
    import outlines_core as oc

    return oc.Vocabulary(eos, token_bytes(tokenizer))
