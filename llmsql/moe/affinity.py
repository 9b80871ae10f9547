"""Row order that helps experts (no torch): predict each row's experts from a routing table and
group rows whose experts overlap into the same engine step.

A **routing table** (``llmsql moe-profile`` writes one next to the learned predictor,
:func:`table_path`) holds, for the most frequent token ids of a routing trace, each MoE
layer's most frequent top-k experts for that token. A row's **signature** is the set of
(layer, expert) its last prompt tokens predict (:func:`signature`), as a bit mask (bit
``position * E + expert``). :func:`order_rows` chains rows so that each engine step's rows
need few distinct experts (:func:`step_cost`), keeping prefix groups contiguous and in order;
:func:`ordering_pays` says, from the cost model, whether that can change anything.

Why it can help at all: in a decode step of ``B`` rows each MoE layer needs the union of the
rows' experts, and an expert cache of ``S`` slots holds a step's working set across its decode
steps only when that union is small. Why it often cannot: every step starts with a prefill
of its rows' prompts, which at prompt lengths uses nearly every expert (a layer_sweep regime),
so nothing carries from one step to the next, and at large steps the union is every expert.

>>> table = RoutingTable(layers=(0, 1), num_experts=4, top_k=1,
...                      experts={7: ((0,), (1,)), 8: ((2,), (3,))})
>>> bin(signature(table, [7])), bin(signature(table, [8, 99]))
('0b100001', '0b10000100')
>>> order_rows([[0, 1, 2, 3]], [0b01, 0b10, 0b01, 0b10], batch_size=2)
[0, 2, 1, 3]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmsql.errors import ConfigError
from llmsql.moe.plan import Hardware, MoEShape, choose_plan, experts_used

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

TABLE_FORMAT = "llmsql-routing-table"
TABLE_VERSION = 1
TABLE_SUFFIX = ".routing.json"
"""The table of the predictor ``<dir>/predictor.pt`` is ``<dir>/predictor.routing.json``."""
DEFAULT_TABLE_TOKENS = 20_000
"""Token ids a table keeps (the most frequent in the trace)."""
SIGNATURE_TOKENS = 16
"""Tokens at the end of a row's own text whose predicted experts make its signature
(bench/results/moe_row_order.md compares 4, 16, 64 and all)."""
WINDOW = 64
"""Candidates :func:`order_rows` looks at for each position (O(n * WINDOW))."""
MAX_USED_SHARE = 0.75
"""A decode step that uses more than this share of each layer's experts (uniform routing)
leaves nothing to group: :func:`ordering_pays` says no."""
MIN_PREDICTED_SAVING = 0.10
"""The rule moves rows only when the table predicts at least this share fewer experts per
step: on the tiny MoE of bench/results/moe_row_order.md, predicted savings of 3-5% came with
no measured gain (the table's signatures predicted a row's decode experts no better than
another row's)."""
MIN_ANSWER_TOKENS = 4
"""Shorter answers make a call prefill-bound (the prefill uses every expert): no gain."""
_FIX = "write it again with `llmsql moe-profile --model <folder> --sql ...`"


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """Per token id, each MoE layer's most frequent experts in a routing trace."""

    layers: tuple[int, ...]
    """Model layer indices of the MoE layers, ascending (bit positions follow this order)."""
    num_experts: int
    top_k: int
    experts: Mapping[int, tuple[tuple[int, ...], ...]] = field(repr=False)
    """Token id -> per MoE layer (in ``layers`` order), its experts, most frequent first."""
    model: str = ""
    tokens_seen: int = 0
    """Tokens of the trace the table was counted on."""
    masks: dict[int, int] = field(init=False, repr=False, compare=False)
    """Token id -> its experts as a :func:`signature` bit mask (computed once)."""

    def __post_init__(self) -> None:
        e = self.num_experts
        masks = {token: sum({1 << (p * e + x) for p, ex in enumerate(per) for x in ex})
                 for token, per in self.experts.items()}
        object.__setattr__(self, "masks", masks)

    def to_json(self) -> dict[str, Any]:
        """The file's content (:func:`save_table`)."""
        return {"format": TABLE_FORMAT, "version": TABLE_VERSION, "model": self.model,
                "layers": list(self.layers), "num_experts": self.num_experts,
                "top_k": self.top_k, "tokens_seen": self.tokens_seen,
                "experts": {str(t): [list(e) for e in per] for t, per in self.experts.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoutingTable:
        """The table :meth:`to_json` gave (ValueError, KeyError or TypeError when malformed)."""
        layers = tuple(int(i) for i in data["layers"])
        e, k = int(data["num_experts"]), int(data["top_k"])
        experts: dict[int, tuple[tuple[int, ...], ...]] = {}
        for token, per in data["experts"].items():
            row = tuple(tuple(int(x) for x in ex) for ex in per)
            if len(row) != len(layers) or any(not 0 <= x < e for ex in row for x in ex):
                msg = f"token {token}: {len(row)} layers or an expert outside 0..{e - 1}"
                raise ValueError(msg)
            experts[int(token)] = row
        return cls(layers, e, k, experts, str(data.get("model", "")),
                   int(data.get("tokens_seen", 0)))


def table_path(profile: str | os.PathLike[str]) -> Path:
    """The routing table stored beside a predictor file.

    >>> table_path("/m/llmsql_moe/predictor.pt").as_posix()
    '/m/llmsql_moe/predictor.routing.json'
    """
    path = Path(profile)
    return path.with_name(path.stem + TABLE_SUFFIX)


def save_table(table: RoutingTable, path: str | os.PathLike[str]) -> None:
    """Write ``table`` as JSON (its folder created)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(table.to_json(), separators=(",", ":")), encoding="utf-8")


def load_table(path: str | os.PathLike[str]) -> RoutingTable:
    """The routing table in ``path``.

    Raises:
        ConfigError: missing, unreadable or malformed file, or another format or version.
    """
    where = f"cannot load the routing table {os.fspath(path)!r}"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        msg = f"{where}: unreadable ({type(exc).__name__}: {exc}); {_FIX}"
        raise ConfigError(msg) from exc
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
        msg = f"{where}: not a routing table (no '{TABLE_FORMAT}' header); {_FIX}"
        raise ConfigError(msg)
    if data.get("version") != TABLE_VERSION:
        msg = f"{where}: format version {data.get('version')!r}, not {TABLE_VERSION}; {_FIX}"
        raise ConfigError(msg)
    try:
        return RoutingTable.from_json(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        msg = f"{where}: malformed content ({exc}); {_FIX}"
        raise ConfigError(msg) from exc


def signature(table: RoutingTable, ids: Sequence[int], /) -> int:
    """The (layer, expert) pairs the tokens ``ids`` predict, as a bit mask (unknown ids
    predict nothing).
    """
    masks = table.masks
    mask = 0
    for token in set(ids):
        mask |= masks.get(token, 0)
    return mask


def step_cost(order: Sequence[int], signatures: Sequence[int], batch_size: int) -> int:
    """Distinct predicted (layer, expert) pairs per step, summed over the steps of
    ``batch_size`` consecutive rows of ``order`` (lower: steps need fewer experts).

    >>> step_cost([0, 1, 2, 3], [0b01, 0b10, 0b01, 0b10], 2)
    4
    """
    total = 0
    for lo in range(0, len(order), max(1, batch_size)):
        union = 0
        for row in order[lo:lo + batch_size]:
            union |= signatures[row]
        total += union.bit_count()
    return total


def order_rows(groups: Sequence[Sequence[int]], signatures: Sequence[int], *, batch_size: int,
               window: int = WINDOW) -> list[int]:
    """A send order of the rows of ``groups`` (each a list of row indexes into
    ``signatures``): the groups stay contiguous and in order; within each, rows are chained
    greedily so that each step of ``batch_size`` consecutive rows (steps cut every
    ``batch_size`` positions from the start) adds the fewest new predicted experts to the
    step's union (ties: the most shared, then the earliest row). A new step starts from the
    previous step's union. Among the next ``window`` rows of the group only. The chain is
    kept only when its :func:`step_cost` is below the input order's, so the result never
    costs more than the concatenated groups.
    """
    size = max(1, batch_size)
    given = [row for group in groups for row in group]
    out: list[int] = []
    union = previous = 0
    for group in groups:
        left = list(group)
        while left:
            if len(out) % size == 0:
                previous, union = union or previous, 0
            base = union or previous
            best = min(range(min(window, len(left))), key=lambda k: (
                (signatures[left[k]] & ~base).bit_count(),
                -(signatures[left[k]] & base).bit_count(), k))
            row = left.pop(best)
            union |= signatures[row]
            out.append(row)
    if step_cost(out, signatures, size) < step_cost(given, signatures, size):
        return out
    return given


def ordering_pays(shape: MoEShape, *, slots: int, step_rows: int, answer_tokens: int,
                  plan: str = "auto", accuracy: float = 0.0, lookahead: int = 2,
                  hw: Hardware | None = None) -> tuple[bool, str]:
    """Whether grouping rows by predicted experts can save expert loads for a call decoding
    ``answer_tokens`` tokens in steps of ``step_rows`` rows, and why (or why not).

    >>> olmoe = MoEShape(moe_layers=16, experts=64, top_k=8, hidden=2048, intermediate=1024)
    >>> ordering_pays(olmoe, slots=410, step_rows=4, answer_tokens=32, plan="lru")[0]
    True
    >>> print(ordering_pays(olmoe, slots=410, step_rows=16, answer_tokens=32, plan="lru")[1])
    a decode step of 16 rows uses about 88% of each layer's experts
    """
    if answer_tokens < MIN_ANSWER_TOKENS:
        what = (f"answers of at most {answer_tokens} token(s)" if answer_tokens
                else "the answers are scored choices, not decoded")
        return False, f"{what}: the call is prefill-bound and a prefill uses nearly every expert"

    est = choose_plan(shape, slots=slots, tokens=step_rows, hw=hw, accuracy=accuracy,
                      lookahead=lookahead, plan=plan)
    if est.plan == "all_resident":
        return False, "every expert fits on the GPU"
    if est.plan == "layer_sweep":
        return False, f"layer_sweep streams every expert at {step_rows} rows per step"
    share = experts_used(shape, step_rows) / shape.experts
    if share > MAX_USED_SHARE:
        return False, (f"a decode step of {step_rows} rows uses about {share:.0%} of each "
                       "layer's experts")
    return True, (f"plan {est.plan} at {step_rows} rows per step, about {share:.0%} of each "
                  "layer's experts per decode step")


@dataclass(frozen=True, slots=True)
class ExpertRouting:
    """What the ``expert_order`` rule knows of a call's MoE model: its shape and cache, the
    engine's rows per step, the plan settings, and its routing table (None: not profiled).
    """

    shape: MoEShape
    slots: int
    step_rows: int
    """Rows the engine runs together (the transformers backend's ``batch_size``)."""
    table: RoutingTable | None
    table_file: str
    tokenize: Callable[[str], Sequence[int]] | None = field(default=None, compare=False)
    """Token ids of a bare text (no special tokens, no chat template)."""
    plan: str = "auto"
    accuracy: float = 0.0
    lookahead: int = 2

    def pays(self, answer_tokens: int) -> tuple[bool, str]:
        """:func:`ordering_pays` for this model and cache."""
        return ordering_pays(self.shape, slots=self.slots, step_rows=self.step_rows,
                             answer_tokens=answer_tokens, plan=self.plan,
                             accuracy=self.accuracy, lookahead=self.lookahead)
