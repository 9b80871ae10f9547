"""What every LLM function shares: its options, its output contract and its spec.

An LLM function is one module of :mod:`llmsql.udfs` exporting ``SPEC``, a :class:`UDFSpec`
that carries everything the rest of llmsql asks about it: the SQL result type (DuckDB name
and Arrow type), the request constraints for a backend's abilities (choices, JSON schema,
choice probabilities), the answer parser, the options only it takes, and structural flags
(an aggregate, a row predicate). Planner, DataFrame API, LLM step, EXPLAIN and the Spark
engine read the spec; none of them switches on the function.

>>> choice_probs_text(("Yes", "No"), (0.75, 0.25))
'{"Yes": 0.75, "No": 0.25}'
>>> read_choice_probs('{"Yes": 0.75, "No": 0.25}')
{'Yes': 0.75, 'No': 0.25}
>>> read_choice_probs("Yes") is None
True
"""

from __future__ import annotations

import enum
import functools
import importlib
import json
import pathlib
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence


class Volatility(enum.Enum):
    """Whether equal inputs give equal answers (dedup and caching need IMMUTABLE)."""

    IMMUTABLE = "immutable"
    VOLATILE = "volatile"


@dataclass(frozen=True, slots=True)
class SchemaField:
    """One field of an LLM_EXTRACT schema: a name and a DuckDB type name."""

    name: str
    type: str


@dataclass(frozen=True, slots=True)
class CallOptions:
    """Per-call options given as ``name => value`` arguments.

    ``labels`` and ``schema`` are options of one function each (see
    :attr:`UDFSpec.options`); the others every function takes.
    """

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 0.0
    seed: int | None = None
    labels: tuple[str, ...] | None = None
    schema: tuple[SchemaField, ...] | None = None
    truncate: bool = False
    adapter: str | None = None
    """A LoRA adapter of the session's catalog to run the call with (``adapter =>
    'name'``); None: the base model alone."""

    @property
    def volatility(self) -> Volatility:
        """Reproducible answers: temperature 0, or a fixed seed."""
        if self.temperature == 0 or self.seed is not None:
            return Volatility.IMMUTABLE
        return Volatility.VOLATILE


@dataclass(frozen=True, slots=True)
class Parsed:
    """An answer parsed into its SQL value; ``ok`` False means NULL and counted."""

    value: object
    ok: bool
    reason: str = ""


class Abilities(Protocol):
    """What a function's request may ask of the backend: the backend's
    :class:`~llmsql.backends.base.Capabilities`, which the LLM step passes.
    """

    @property
    def constrained_choice(self) -> bool:
        """Answers can be constrained to given choices."""
        ...

    @property
    def json_schema(self) -> bool:
        """Answers can be constrained to a JSON schema."""
        ...

    @property
    def choice_probabilities(self) -> bool:
        """The choices' probabilities can be returned."""
        ...


@dataclass(frozen=True, slots=True)
class Constraints:
    """How a function's requests are asked: the fields of the backend ``Request`` that
    constrain the answer, plus a line appended to every prompt.
    """

    choices: tuple[str, ...] | None = None
    json_schema: str | None = None
    choice_probs: bool = False
    """With ``choices``: ask each choice's probability (the answer then reads as
    :func:`choice_probs_text`)."""
    suffix: str = ""
    """Appended to the rendered prompt when the request is sent (e.g. LLM_SCORE asking for
    a number where the backend cannot give probabilities)."""


FREE_TEXT = Constraints()


@dataclass(frozen=True, slots=True)
class OptionRule:
    """An option only some functions take (``labels =>``, ``schema =>``): its name (a
    :class:`CallOptions` field) and ``check``, which gets the written value (None when not
    given) and returns the option's value, or raises ValueError saying what is wrong.
    """

    name: str
    check: Callable[[object], object]


def _no_constraints(options: CallOptions, abilities: Abilities, /) -> Constraints:
    return FREE_TEXT


def _text(options: CallOptions, /) -> pa.DataType:
    return pa.string()


@dataclass(frozen=True, slots=True, eq=False)
class UDFSpec:
    """What the engine needs to know about one LLM function (one module's ``SPEC``)."""

    name: str
    """The SQL name, e.g. ``LLM_SCORE``."""
    kind: str
    """Its :class:`CallKind` member's name, e.g. ``SCORE``."""
    sql_type: str
    """The SQL result type, as EXPLAIN and the docs name it."""
    default_max_tokens: int
    parse: Callable[[str, CallOptions], Parsed]
    """Answer text -> SQL value (``ok`` False: NULL and counted as unparseable)."""
    arrow_type: Callable[[CallOptions], pa.DataType] = _text
    """The Arrow type of the result column, for the call's options."""
    constraints: Callable[[CallOptions, Abilities], Constraints] = _no_constraints
    """The request constraints for the call's options and the backend's abilities."""
    options: tuple[OptionRule, ...] = ()
    """Options only this function takes."""
    aggregate: bool = False
    """An aggregate: one answer per group over all its rows (map-reduce past the context)."""
    predicate: bool = False
    """A row predicate (BOOLEAN): LIMIT may stop it early, WHERE conjuncts of it may be
    reordered by measured selectivity."""
    reduce_prompt: Callable[[str, Sequence[str]], str] | None = None
    """Aggregates: the prompt combining partial answers (``instruction``, partials)."""

    def __reduce__(self) -> tuple[Callable[[str], UDFSpec], tuple[str]]:
        return (spec_named, (self.name,))

    @property
    def call_kind(self) -> Any:
        """This function's ``CallKind`` member."""
        return registry().kinds[self.kind]


def spec_named(name: str, /) -> UDFSpec:
    """The registered spec of the SQL function ``name`` (a spec pickles as its name)."""
    return registry().specs[name]


class _Kind(enum.Enum):
    """Base of ``CallKind``: a member's value is its function's SQL name."""

    @property
    def spec(self) -> UDFSpec:
        """The function's spec."""
        return registry().by_kind[self]


@dataclass(frozen=True, slots=True)
class Registry:
    """The LLM functions found in :mod:`llmsql.udfs`."""

    specs: dict[str, UDFSpec]
    """Spec by SQL name."""
    kinds: type[enum.Enum]
    """``CallKind``: one member per function (named by ``UDFSpec.kind``, valued its SQL
    name)."""
    by_kind: dict[Any, UDFSpec]
    """Spec by ``CallKind`` member."""


@functools.cache
def registry() -> Registry:
    """The ``SPEC`` of every module of :mod:`llmsql.udfs`, in module-name order (built once
    and kept here, so that the package's objects stay the same if it is executed again).
    """
    package = __name__.rpartition(".")[0]
    specs = []
    for info in sorted(pkgutil.iter_modules([str(pathlib.Path(__file__).parent)]),
                       key=lambda m: m.name):
        spec = getattr(importlib.import_module(f"{package}.{info.name}"), "SPEC", None)
        if isinstance(spec, UDFSpec):
            specs.append(spec)
    kinds = _Kind("CallKind", [(s.kind, s.name) for s in specs],  # type: ignore[call-overload]
                  module=package, qualname="CallKind")
    return Registry({s.name: s for s in specs}, kinds, {kinds[s.kind]: s for s in specs})


def choice_probs_text(choices: Sequence[str], probs: Sequence[float], /) -> str:
    """How an answer with choice probabilities is kept (query memo, result cache): the JSON
    object ``{choice: probability}`` (floats round-trip exactly).
    """
    return json.dumps(dict(zip(choices, probs, strict=True)))


def read_choice_probs(text: str, /) -> dict[str, float] | None:
    """The probabilities of an answer kept as :func:`choice_probs_text`, else None."""
    if not text.startswith("{"):
        return None
    try:
        obj: Any = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in obj.values()):
        return None
    return {str(k): float(v) for k, v in obj.items()}


def __getattr__(name: str) -> Any:
    # CallKind is built from the functions' modules (see registry); importable from here too
    if name == "CallKind":
        return registry().kinds
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
