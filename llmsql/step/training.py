"""``CREATE ADAPTER``'s examples: training rows -> the requests the call would send, plus
the label rendered as the call's answer; the held-out split and the held-out metrics.

The requests are built by the LLM step's own path (:func:`~llmsql.step.llm_step.bind`, the
optimizer's prompt rules, :func:`~llmsql.step.llm_step.build_requests`), so a training
example's prompt, choices, JSON schema and ``max_tokens`` are those the call sends for that
row at query time. The answer side is the label as the call answers:

- ``LLM_FILTER``: the backend's choice for TRUE or FALSE (``Yes`` / ``No``); a label may be
  a boolean, 0/1, or one of the strings yes/no/true/false (any case);
- ``LLM_CLASSIFY``: one of the call's ``labels`` (matched ignoring case);
- ``LLM``: the text;
- ``LLM_EXTRACT``: JSON with the schema's fields (a struct, a dict or a JSON string).

Every rendered answer is read back by the function's own parser, so an answer the call
could not give is refused before training starts.

>>> filter_answer(True, ("Yes", "No")), filter_answer("no", ("Yes", "No")), filter_answer(1, None)
('Yes', 'No', 'Yes')
>>> holdout_split(10, 0.2, seed=0)
((0, 1, 2, 3, 4, 5, 7, 8), (6, 9))
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from llmsql.backends.base import AdapterRef, Request, TrainExample
from llmsql.errors import PlanError
from llmsql.optimizer import optimize
from llmsql.parse import parse
from llmsql.plan import ARG_PREFIX, LLMCall
from llmsql.planner import plan_query
from llmsql.step.llm_step import bind, build_requests
from llmsql.udfs.llm_filter import CHOICES

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from llmsql.adapters.statements import CreateAdapter
    from llmsql.backends.base import LLMBackend
    from llmsql.optimizer import RuleContext

_ROWS = "__llmsql_adapter_rows"
_TRUE_WORDS = {"yes": True, "true": True, "no": False, "false": False}
ACCURACY_KINDS = ("LLM_FILTER", "LLM_CLASSIFY")
"""Functions whose held-out answers are scored right or wrong (accuracy before/after)."""


@dataclass(frozen=True, slots=True)
class Examples:
    """A CREATE's labelled rows as training sees them, split into training and held out."""

    train: tuple[TrainExample, ...]
    holdout: tuple[TrainExample, ...]
    holdout_expected: tuple[Any, ...]
    """The SQL value each held-out row should get (TRUE/FALSE, a label...)."""


def training_call(stmt: CreateAdapter, /) -> LLMCall:
    """The ``FOR`` call planned as a query plans it (the same template, fields, options)."""
    query = f"SELECT {stmt.call.text} FROM {_ROWS}"
    return plan_query(query, parse(query)[0], query_id="adapter").calls[0]


def call_requests(call: LLMCall, rows: pa.Table, backend: LLMBackend,
                  rule_ctx: RuleContext, adapter: AdapterRef | None = None) -> list[Request]:
    """The request ``call`` sends for each row of ``rows`` (columns named as its fields),
    in row order: bound, rewritten by the prompt rules and built as the LLM step does.
    """
    inputs = pa.table({f"{ARG_PREFIX}{j}": rows.column(f.name)
                       for j, f in enumerate(call.fields)})
    batch, _ = optimize(bind(call, inputs), rule_ctx)
    rep = batch.rep or tuple(range(rows.num_rows))
    distinct = sorted(set(rep))
    prompt_of = dict(zip(distinct, batch.prompts(distinct), strict=True))
    return build_requests(call, [prompt_of[rep[i]] for i in range(rows.num_rows)], backend,
                          adapter)


def filter_answer(value: object, choices: Sequence[str] | None, /) -> str | None:
    """An LLM_FILTER label as the call's answer (``choices``: the request's), or None when
    ``value`` is not a truth value.
    """
    truth: bool | None = None
    if isinstance(value, bool):
        truth = value
    elif isinstance(value, int) and value in (0, 1):
        truth = bool(value)
    elif isinstance(value, str):
        truth = _TRUE_WORDS.get(value.strip().lower())
    if truth is None:
        return None
    yes, no = (choices or CHOICES)[:2]
    return yes if truth else no


def _classify_answer(value: object, labels: Sequence[str]) -> str | None:
    if not isinstance(value, str):
        return None
    if value in labels:
        return value
    found = [lab for lab in labels if lab.lower() == value.strip().lower()]
    return found[0] if len(found) == 1 else None


def _extract_answer(value: object, call: LLMCall) -> str | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    schema = call.options.schema or ()
    if not isinstance(value, dict) or set(value) != {f.name for f in schema}:
        return None
    return json.dumps({f.name: value[f.name] for f in schema}, ensure_ascii=False, default=str)


def _want(call: LLMCall) -> str:
    kind = call.kind.value
    if kind == "LLM_FILTER":
        return "a truth value: TRUE/FALSE, 1/0, or 'yes'/'no'/'true'/'false'"
    if kind == "LLM_CLASSIFY":
        return f"one of the call's labels {list(call.options.labels or ())}"
    if kind == "LLM_EXTRACT":
        names = [f.name for f in call.options.schema or ()]
        return f"a struct or JSON object with exactly the fields {names}"
    return "a non-empty string"


def answer_text(call: LLMCall, value: object, choices: Sequence[str] | None) -> str | None:
    """The label ``value`` as ``call``'s answer text, or None when it cannot be one."""
    kind = call.kind.value
    if value is None:
        return None
    if kind == "LLM_FILTER":
        text = filter_answer(value, choices)
    elif kind == "LLM_CLASSIFY":
        text = _classify_answer(value, call.options.labels or ())
    elif kind == "LLM_EXTRACT":
        text = _extract_answer(value, call)
    else:
        text = value if isinstance(value, str) and value.strip() else None
    if text is None or not call.kind.spec.parse(text, call.options).ok:
        return None
    return text


def _label_type(call: LLMCall, column: pa.ChunkedArray, label: str) -> None:
    """Refuse a label column whose type can never hold a valid answer."""
    t = column.type
    text = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
    ok = {
        "LLM_FILTER": text or pa.types.is_boolean(t) or pa.types.is_integer(t),
        "LLM_CLASSIFY": text,
        "LLM": text,
        "LLM_EXTRACT": text or pa.types.is_struct(t) or pa.types.is_map(t),
    }.get(call.kind.value, True)
    if not ok:
        msg = (f"CREATE ADAPTER ... FOR {call.kind.value}: label column {label!r} has type "
               f"{t}, but each label must be {_want(call)}; cast or compute it in the AS "
               "SELECT")
        raise PlanError(msg)


def holdout_split(n: int, fraction: float, *, seed: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Row numbers for training and for the held-out set (``fraction`` of ``n``, at least
    one row when ``fraction`` > 0 and ``n`` > 1; seeded, so a re-run splits alike).
    """
    k = round(n * fraction)
    if fraction > 0 and n > 1:
        k = min(max(k, 1), n - 1)
    chosen = set(random.Random(seed).sample(range(n), k))
    return (tuple(i for i in range(n) if i not in chosen), tuple(sorted(chosen)))


def build_examples(stmt: CreateAdapter, call: LLMCall, rows: pa.Table, backend: LLMBackend,
                   rule_ctx: RuleContext) -> Examples:
    """``rows`` (the AS SELECT's result) as training examples and held-out examples.

    Raises:
        PlanError: no rows, or a label that is NULL, of the wrong type or not an answer
            the call could give (the message names the value and the row).
    """
    if stmt.label not in rows.column_names:
        msg = (f"CREATE ADAPTER {stmt.name}: the AS SELECT gave no column {stmt.label!r} "
               f"(it gave {', '.join(rows.column_names)}); select the label column")
        raise PlanError(msg)
    if rows.num_rows == 0:
        msg = (f"CREATE ADAPTER {stmt.name}: the AS SELECT returned no rows, so there is "
               "nothing to train on; check its FROM and WHERE")
        raise PlanError(msg)
    column = rows.column(stmt.label)
    _label_type(call, column, stmt.label)
    requests = call_requests(call, rows, backend, rule_ctx)
    answers = [_answer(call, stmt, v, r, i) for i, (v, r) in
               enumerate(zip(column.to_pylist(), requests, strict=True))]
    train, hold = holdout_split(rows.num_rows, stmt.lora.holdout, seed=stmt.lora.seed)
    if not train:
        msg = (f"CREATE ADAPTER {stmt.name}: {rows.num_rows} row(s) leave none to train on "
               f"after holding out {stmt.lora.holdout:.0%}; add rows or lower holdout")
        raise PlanError(msg)
    parse = call.kind.spec.parse
    return Examples(
        tuple(TrainExample(requests[i], answers[i]) for i in train),
        tuple(TrainExample(requests[i], answers[i]) for i in hold),
        tuple(parse(answers[i], call.options).value for i in hold))


def _answer(call: LLMCall, stmt: CreateAdapter, value: object, req: Request, row: int) -> str:
    text = answer_text(call, value, req.choices)
    if text is None:
        msg = (f"CREATE ADAPTER {stmt.name}: row {row + 1} of the AS SELECT has label "
               f"{stmt.label} = {value!r}, but a label for {call.kind.value} must be "
               f"{_want(call)}; fix or filter out such rows in the AS SELECT")
        raise PlanError(msg)
    return text


def accuracy(call: LLMCall, examples: Sequence[TrainExample], expected: Sequence[Any],
             generate: Callable[[list[Request]], list[Any]],
             adapter: AdapterRef | None) -> float | None:
    """The share of ``examples`` the call answers as expected (run with ``adapter``, or the
    base model); None when the function has no right or wrong answer or there are none.
    """
    if call.kind.value not in ACCURACY_KINDS or not examples:
        return None
    reqs = [_with_adapter(e.request, adapter) for e in examples]
    parse = call.kind.spec.parse
    got = [None if r.error else parse(r.text, call.options).value for r in generate(reqs)]
    return sum(g == e for g, e in zip(got, expected, strict=True)) / len(examples)


def _with_adapter(req: Request, adapter: AdapterRef | None) -> Request:
    return Request(req.prompt, req.max_tokens, req.temperature, req.seed, req.choices,
                   req.json_schema, req.ignore_eos, req.choice_probs, adapter)
