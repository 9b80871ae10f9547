"""RuleContext: everything a rule may consult, passed explicitly."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmsql.backends.base import Capabilities

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from llmsql.moe.affinity import ExpertRouting


def values_key(values: Sequence[str], /) -> int:
    """A 64-bit digest of one row's rendered field values, the same in every process.

    >>> values_key(["a", "bc"]) == values_key(["a", "bc"]) != values_key(["ab", "c"])
    True
    """
    digest = hashlib.blake2b(digest_size=8)
    for value in values:
        data = value.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return int.from_bytes(digest.digest(), "little")


@dataclass(frozen=True, slots=True)
class PinnedFieldOrders:
    """Per-row field orders chosen over one call's whole input, for rules that see part of it.

    The Spark engine runs the rules inside each partition's task, over that partition's rows
    only; the driver chooses the field orders over all of the call's distinct inputs, as the
    DuckDB engine does, and ships them here. Rows are keyed by :func:`values_key` of their
    rendered values (8 bytes a row: 200,000 rows pickle to about 2.5 MB).

    >>> pins = PinnedFieldOrders.of("c1", [(("x", "1"), (1, 0)), (("y", "2"), (0, 1))])
    >>> pins.lookup([("y", "2"), ("z", "3")])
    [(0, 1), None]
    """

    call_id: str
    """The call whose rows these are (an ``LLMCall.id``)."""
    field_orders: tuple[tuple[int, ...], ...]
    """The distinct field orders (indexes into the template's fields)."""
    keys: tuple[int, ...] = field(repr=False)
    """Per row, :func:`values_key` of its rendered values."""
    index: tuple[int, ...] = field(repr=False)
    """Per row, its field order as an index into ``field_orders``."""

    @classmethod
    def of(cls, call_id: str,
           rows: Iterable[tuple[Sequence[str], tuple[int, ...]]]) -> PinnedFieldOrders:
        """Pins from ``(rendered values, field order)`` pairs, one per distinct row."""
        orders: dict[tuple[int, ...], int] = {}
        keys: list[int] = []
        index: list[int] = []
        for values, order in rows:
            keys.append(values_key(values))
            index.append(orders.setdefault(order, len(orders)))
        return cls(call_id, tuple(orders), tuple(keys), tuple(index))

    def lookup(self, rows: Sequence[Sequence[str]], /) -> list[tuple[int, ...] | None]:
        """The pinned field order of each row (None: the row is not pinned)."""
        table = dict(zip(self.keys, self.index, strict=True))
        found = (table.get(values_key(values)) for values in rows)
        return [None if k is None else self.field_orders[k] for k in found]

    def __len__(self) -> int:
        """The number of pinned rows."""
        return len(self.keys)


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
    pinned: PinnedFieldOrders | None = None
    """Field orders already chosen over the call's whole input (Spark: on the driver, then
    each partition's rules keep them): ``reorder_prompts`` orders only the rows of a batch
    whose every row is pinned. None: the rule chooses over the batch's rows."""
    experts: Callable[[str | None], ExpertRouting | None] | None = None
    """A call's model name (None: the session's) -> its expert offload figures and routing
    table, or None without expert offload (``expert_order``). None: no such lookup (Spark
    workers, tests)."""
