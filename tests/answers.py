"""A deterministic answer function for planner/optimizer invariants (docs/STYLE.md 7.8).

It answers from the *set* of ``name: value`` lines of a prompt, so the answer is a pure
function of the row's values, independent of field order and of send order: an optimized
and an unoptimized plan must then return identical results, and every query's expected
result can be computed with plain SQL. It does not stand in for a model: tests of model
behaviour use the real SmolLM2 model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from llmsql.backends.base import BackendSpec, Capabilities, Request, Response


def fields_of(prompt: str) -> dict[str, str]:
    """``name: value`` lines of a prompt (the instruction line has no ': ')."""
    out: dict[str, str] = {}
    for line in prompt.splitlines()[1:]:
        name, sep, value = line.partition(": ")
        if sep:
            out[name] = value
    return out


class RuleBackend:
    """FILTER: 'Yes' iff a value contains 'Great'; MAP: values joined, sorted, upper-cased;
    CLASSIFY: 'long' if review has > 4 chars else 'short'; EXTRACT: first word + length;
    AGG: the number of 'review:' lines (partial answers are summed)."""

    name = "rule"

    def __init__(self, max_model_len: int = 100_000, constrained: bool = True) -> None:
        self.capabilities = Capabilities(
            prefix_caching=False, constrained_choice=constrained, json_schema=constrained,
            max_model_len=max_model_len,
        )
        self.calls = 0
        self.prompts: list[str] = []
        self.spec = BackendSpec("rule")

    def generate(self, batch: Sequence[Request], /) -> list[Response]:
        self.calls += 1
        self.prompts += [r.prompt for r in batch]
        return [Response(self._answer(r), prompt_tokens=len(r.prompt) // 4) for r in batch]

    def _answer(self, r: Request) -> str:
        f = fields_of(r.prompt)
        if "Partial answers" in r.prompt:
            return str(sum(int(x[2:]) for x in r.prompt.splitlines() if x.startswith("- ")))
        if r.choices == ("Yes", "No") or "?" in r.prompt.splitlines()[0]:
            return "Yes" if any("Great" in v for v in f.values()) else "No"
        if r.choices:
            return "long" if len(f.get("review", "")) > 4 else "short"
        if r.json_schema or "json" in r.prompt.splitlines()[0].lower():
            review = f.get("review", "")
            return json.dumps({"word": review.split(" ")[0], "n": len(review)})
        if r.prompt.startswith("Count"):
            return str(r.prompt.count("review: "))
        return " | ".join(sorted(v.upper() for v in f.values()))

    def count_tokens(self, text: str, /) -> int:
        return len(text) // 4

    def model_id(self) -> str:
        return "rule"

    def close(self) -> None:
        pass
