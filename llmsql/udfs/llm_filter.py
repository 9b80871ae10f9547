"""LLM_FILTER(instruction, field, ...) -> BOOLEAN.

Constrained to ``Yes``/``No`` where the backend can; otherwise the answer is parsed, and
one that is neither is NULL and counted, never silently TRUE or FALSE.

>>> parse(" Yes.", CallOptions()).value, parse("no", CallOptions()).value
(True, False)
>>> parse("maybe", CallOptions()).ok
False
"""

from __future__ import annotations

import re

import pyarrow as pa

from llmsql.udfs.base import Abilities, CallOptions, Constraints, Parsed, UDFSpec

CHOICES = ("Yes", "No")
DEFAULT_MAX_TOKENS = 4
_WORD = re.compile(r"[A-Za-z]+")
_TRUE = {"yes", "true", "y"}
_FALSE = {"no", "false", "n"}
_YES = Parsed(True, True)
_NO = Parsed(False, True)
_YES_NO = Constraints(choices=CHOICES)
_FREE = Constraints()


def parse(text: str, options: CallOptions, /) -> Parsed:
    """Map the first word of the answer to TRUE/FALSE; anything else is NULL."""
    m = _WORD.search(text)
    word = m.group(0).lower() if m else ""
    if word in _TRUE:
        return _YES
    if word in _FALSE:
        return _NO
    return Parsed(None, False, f"answer is neither yes nor no: {text[:60]!r}")


def constraints(options: CallOptions, abilities: Abilities, /) -> Constraints:
    """Yes or No, where the backend can constrain the answer."""
    return _YES_NO if abilities.constrained_choice else _FREE


SPEC = UDFSpec("LLM_FILTER", "FILTER", "BOOLEAN", DEFAULT_MAX_TOKENS, parse,
               arrow_type=lambda options: pa.bool_(), constraints=constraints, predicate=True)
