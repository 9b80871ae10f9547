"""LLM_CLASSIFY(instruction, labels => [...], field, ...) -> one of the labels.

>>> o = CallOptions(labels=("positive", "negative"))
>>> parse("Negative", o).value, parse("it is positive!", o).value, parse("??", o).ok
('negative', 'positive', False)
"""

from __future__ import annotations

from llmsql.udfs.base import CallOptions, Parsed

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
