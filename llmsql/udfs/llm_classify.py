"""LLM_CLASSIFY(instruction, labels => [...], field, ...) -> one of the labels.

>>> o = CallOptions(labels=("positive", "negative"))
>>> parse("Negative", o).value, parse("it is positive!", o).value, parse("??", o).ok
('negative', 'positive', False)
"""

from __future__ import annotations

from llmsql.udfs.base import Abilities, CallOptions, Constraints, OptionRule, Parsed, UDFSpec

DEFAULT_MAX_TOKENS = 16


def parse(text: str, options: CallOptions, /) -> Parsed:
    """Exact label (case-insensitive), else the single label contained in the answer."""
    labels = options.labels or ()
    answer = text.strip().strip(".!\"'").strip()
    for label in labels:
        if answer.lower() == label.lower():
            return Parsed(label, True)
    found = [lab for lab in labels if lab.lower() in answer.lower()]
    longest = max(found, key=len) if found else None
    if longest is not None and all(longest.lower().find(f.lower()) >= 0 for f in found):
        return Parsed(longest, True)
    return Parsed(None, False, f"answer is not one of the labels: {text[:60]!r}")


def check_labels(value: object, /) -> tuple[str, ...]:
    """The ``labels =>`` option: at least two distinct, non-empty strings.

    >>> check_labels(("pos", "neg"))
    ('pos', 'neg')
    >>> check_labels(("pos", "POS"))
    Traceback (most recent call last):
    ValueError: labels must be non-empty and distinct (ignoring case), got ['pos', 'POS']
    """
    if value is None:
        msg = "needs labels => ['label1', 'label2', ...]"
        raise ValueError(msg)
    if not isinstance(value, tuple) or len(value) < 2:
        msg = "labels must be a list of at least two strings, e.g. labels => ['pos', 'neg']"
        raise ValueError(
            msg)
    if any(not lab.strip() for lab in value) or len({lab.lower() for lab in value}) != len(value):
        msg = f"labels must be non-empty and distinct (ignoring case), got {list(value)!r}"
        raise ValueError(
            msg)
    return value


def constraints(options: CallOptions, abilities: Abilities, /) -> Constraints:
    """One of the labels, where the backend can constrain the answer."""
    return Constraints(choices=options.labels if abilities.constrained_choice else None)


SPEC = UDFSpec("LLM_CLASSIFY", "CLASSIFY", "VARCHAR", DEFAULT_MAX_TOKENS, parse,
               constraints=constraints, options=(OptionRule("labels", check_labels),))
