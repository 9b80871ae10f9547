"""RuleContext: everything a rule may consult, passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass

from llmsql.backends.base import Capabilities


@dataclass(frozen=True, slots=True)
class RuleContext:
    """What rules know about the target: backend capabilities and the session's settings."""

    capabilities: Capabilities = Capabilities()
    batch_size: int = 64
    """Prompts per batch handed to the backend."""
    reorder: bool = True
    """Whether row/field reordering may run (off: table order, written field order)."""
    warm: bool = True
    """Whether ``warm_prefixes`` may send shared prefixes ahead of their groups."""
    cache_blocks: int | None = None
    """Prefix-cache capacity in blocks, when known."""
