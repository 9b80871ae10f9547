"""What every LLM function shares: its kind, options and output contract."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class CallKind(enum.Enum):
    """The five LLM functions."""

    MAP = "LLM"
    FILTER = "LLM_FILTER"
    CLASSIFY = "LLM_CLASSIFY"
    EXTRACT = "LLM_EXTRACT"
    AGG = "LLM_AGG"


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
    """Per-call options given as ``name => value`` arguments."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 0.0
    seed: int | None = None
    labels: tuple[str, ...] | None = None
    schema: tuple[SchemaField, ...] | None = None
    truncate: bool = False

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
