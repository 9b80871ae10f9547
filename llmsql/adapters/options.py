"""``USING LORA (...)`` options: names, types, ranges and defaults.

>>> o = lora_options({"rank": 8, "target_modules": "q_proj, v_proj", "lr": 1e-3})
>>> o.rank, o.alpha, o.target_modules, o.lr
(8, 32.0, ('q_proj', 'v_proj'), 0.001)
>>> lora_options({"rank": 0})  # doctest: +ELLIPSIS
Traceback (most recent call last):
llmsql.errors.PlanError: USING LORA option 'rank' must be an integer from 1 to 256, got 0; ...
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmsql.errors import PlanError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


@dataclass(frozen=True, slots=True)
class LoraOptions:
    """How a LoRA adapter is built and trained (the defaults are the issue's)."""

    rank: int = 16
    alpha: float = 32.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    lr: float = 2e-4
    epochs: int = 1
    dropout: float = 0.0
    batch_size: int = 8
    seed: int = 0
    holdout: float = 0.1
    """The fraction of the rows kept out of training to measure the adapter."""

    def to_json(self) -> dict[str, object]:
        """The options as JSON values (lists for tuples)."""
        out = dataclasses.asdict(self)
        out["target_modules"] = list(self.target_modules)
        return out


def _int_in(lo: int, hi: int | None) -> tuple[str, Callable[[object], object]]:
    what = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"

    def check(v: object) -> object:
        ok = isinstance(v, int) and not isinstance(v, bool) and lo <= v <= (hi or v)
        return v if ok else None
    return what, check


def _float_in(what: str, ok: Callable[[float], bool]) -> tuple[str, Callable[[object], object]]:
    def check(v: object) -> object:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return None
        return float(v) if ok(float(v)) else None
    return what, check


def _modules(v: object) -> object:
    parts = v.split(",") if isinstance(v, str) else v if isinstance(v, tuple) else None
    if parts is None or not all(isinstance(p, str) for p in parts):
        return None
    names = tuple(p.strip() for p in parts)
    return names if names and all(_MODULE.match(n) for n in names) else None


RULES: dict[str, tuple[str, Callable[[object], object]]] = {
    "rank": _int_in(1, 256),
    "alpha": _float_in("a number > 0", lambda x: x > 0),
    "target_modules": ("a non-empty list of module names, e.g. 'q_proj,v_proj'", _modules),
    "lr": _float_in("a number between 0 and 1 (exclusive)", lambda x: 0 < x < 1),
    "epochs": _int_in(1, 100),
    "dropout": _float_in("a number from 0 to below 1", lambda x: 0 <= x < 1),
    "batch_size": _int_in(1, 4096),
    "seed": _int_in(0, None),
    "holdout": _float_in("a number from 0 to below 1", lambda x: 0 <= x < 1),
}
"""Each option: what it must be (for messages) and its check (the value, or None if bad)."""
OPTION_NAMES = tuple(RULES)


def lora_options(raw: Mapping[str, object], /) -> LoraOptions:
    """Check the written options (``{name: value}``) and fill in the defaults.

    Raises:
        PlanError: an unknown option (the message lists the known ones), or a value of the
            wrong type or out of range (the message says the allowed range).
    """
    unknown = sorted(set(raw) - set(RULES))
    if unknown:
        msg = (f"unknown USING LORA option {unknown[0]!r}; the options are "
               f"{', '.join(OPTION_NAMES)}")
        raise PlanError(msg)
    values = {}
    for name, value in raw.items():
        what, check = RULES[name]
        checked = check(value)
        if checked is None:
            msg = (f"USING LORA option {name!r} must be {what}, got {value!r}; "
                   f"e.g. {name} => {_example(name)}")
            raise PlanError(msg)
        values[name] = checked
    return LoraOptions(**values)  # type: ignore[arg-type]


def _example(name: str) -> str:
    value = getattr(LoraOptions(), name)
    return repr(",".join(value)) if isinstance(value, tuple) else repr(value)


def lora_options_from_json(data: Mapping[str, object], /) -> LoraOptions:
    """Read :meth:`LoraOptions.to_json` back (checked like written options)."""
    raw = dict(data)
    if isinstance(raw.get("target_modules"), list):
        raw["target_modules"] = tuple(raw["target_modules"])  # type: ignore[arg-type]
    return lora_options(raw)
