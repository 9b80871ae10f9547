"""MoE offload options as one frozen, validated value (no torch: config, CLI and EXPLAIN use it).

A user sets them as ``llmsql.connect(expert_cache=..., moe_plan=..., predictor=...,
lookahead=...)``, as ``SET llmsql.expert_cache = '24GB'`` (and ``moe_plan``, ``predictor``,
``lookahead``), or as CLI flags; the transformers backend receives them as backend options of
the same names. :func:`moe_options` checks them once.

>>> moe_options({"expert_cache": "24GB", "moe_plan": "predictive"})
MoEOptions(expert_cache=24000000000, plan='predictive', predictor='auto', lookahead=2, profile=None)
>>> moe_options({"expert_cache": "40%"}).expert_cache
0.4
>>> moe_options({}) is None
True
>>> moe_options({"expert_cache": "lots"})
Traceback (most recent call last):
...
llmsql.errors.ConfigError: expert_cache='lots': ...
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmsql.errors import ConfigError

if TYPE_CHECKING:
    import os
    from collections.abc import Mapping

PLANS: tuple[str, ...] = ("auto", "predictive", "layer_sweep", "lru")
"""``auto``: the cost model picks per call (:func:`llmsql.moe.plan.choose_plan`);
``predictive``: an expert cache filled ahead by a predictor (after ProMoE); ``layer_sweep``:
stream each layer's experts once per block of rows (after FlexGen), a fixed share of the
experts resident; ``lru``: reactive LRU cache, loads on misses only (the baseline)."""

PREDICTORS: tuple[str, ...] = ("auto", "learned", "next_router", "none")
"""``auto``: ``learned`` when a routing profile is stored with the model (``llmsql
moe-profile``), else ``next_router``; ``learned``: a small per-layer network over hidden
states; ``next_router``: layer i+j's router applied to layer i's hidden state (no training);
``none``: no prediction (what ``lru`` uses)."""

OPTION_NAMES: tuple[str, ...] = ("expert_cache", "moe_plan", "predictor", "lookahead",
                                 "moe_profile")
"""The backend options (and session settings) that configure expert offload."""

PROFILE_FOLDER = "llmsql_moe"
PROFILE_FILE = "predictor.pt"
"""Where ``llmsql moe-profile`` stores a model's routing predictor by default:
``<model>/llmsql_moe/predictor.pt``, its measured figures beside it as ``predictor.json``."""

DEFAULT_LOOKAHEAD = 2
MAX_LOOKAHEAD = 8

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*$")


@dataclass(frozen=True, slots=True)
class MoEOptions:
    """Expert offload settings for one model."""

    expert_cache: int | float
    """GPU memory for experts: bytes (an int), or the share of all experts kept on the GPU
    (a float in (0, 1])."""
    plan: str = "auto"
    """One of :data:`PLANS`."""
    predictor: str = "auto"
    """One of :data:`PREDICTORS`."""
    lookahead: int = DEFAULT_LOOKAHEAD
    """How many layers ahead the predictor prefetches (1 to :data:`MAX_LOOKAHEAD`)."""
    profile: str | None = None
    """A routing profile file (``llmsql moe-profile`` writes one); None: the one stored with
    the model, if any."""

    def __post_init__(self) -> None:
        if isinstance(self.expert_cache, bool) or not isinstance(self.expert_cache, int | float):
            _bad("expert_cache", self.expert_cache, "give bytes ('24GB') or a share ('0.4')")
        if isinstance(self.expert_cache, float) and not 0.0 < self.expert_cache <= 1.0:
            _bad("expert_cache", self.expert_cache, "a share of the experts is in (0, 1]")
        if isinstance(self.expert_cache, int) and self.expert_cache <= 0:
            _bad("expert_cache", self.expert_cache, "give a positive size such as '24GB'")
        if self.plan not in PLANS:
            _bad("moe_plan", self.plan, f"choose one of {', '.join(PLANS)}")
        if self.predictor not in PREDICTORS:
            _bad("predictor", self.predictor, f"choose one of {', '.join(PREDICTORS)}")
        if isinstance(self.lookahead, bool) or not isinstance(self.lookahead, int) or not (
                1 <= self.lookahead <= MAX_LOOKAHEAD):
            _bad("lookahead", self.lookahead, f"give a whole number from 1 to {MAX_LOOKAHEAD}")

    def as_options(self) -> dict[str, Any]:
        """The backend options that give this value back through :func:`moe_options`."""
        out: dict[str, Any] = {"expert_cache": self.expert_cache, "moe_plan": self.plan,
                               "predictor": self.predictor, "lookahead": self.lookahead}
        if self.profile is not None:
            out["moe_profile"] = self.profile
        return out


def default_profile_path(model_dir: str | os.PathLike[str]) -> Path:
    """Where a model's predictor is stored: ``<model_dir>/llmsql_moe/predictor.pt``.

    >>> default_profile_path("/models/m").as_posix()
    '/models/m/llmsql_moe/predictor.pt'
    """
    return Path(model_dir) / PROFILE_FOLDER / PROFILE_FILE


def profile_path(options: MoEOptions, model_dir: str | os.PathLike[str] | None) -> Path | None:
    """The routing profile the engine uses (and EXPLAIN reads): ``options.profile``, else the
    model's own under ``model_dir`` (None without either).
    """
    if options.profile is not None:
        return Path(options.profile).expanduser()
    return None if model_dir is None else default_profile_path(model_dir)


def _bad(name: str, value: object, fix: str) -> None:
    msg = f"{name}={value!r}: {fix}"
    raise ConfigError(msg)


def parse_cache_size(value: object) -> int | float:
    """``expert_cache`` from a user: bytes (``'24GB'``, ``'512MiB'``, an int) or a share of
    the experts (``0.4``, ``'0.4'``, ``'40%'``).

    >>> parse_cache_size("24GB"), parse_cache_size("1.5GiB"), parse_cache_size("0.25")
    (24000000000, 1610612736, 0.25)
    >>> parse_cache_size(3), parse_cache_size("40%")
    (3, 0.4)
    """
    if isinstance(value, bool):
        _bad("expert_cache", value, "give bytes ('24GB') or a share ('0.4')")
    if isinstance(value, int | float):
        return value
    text = str(value).strip()
    if text.endswith("%"):
        try:
            return float(text[:-1]) / 100.0
        except ValueError:
            _bad("expert_cache", value, "a percentage looks like '40%'")
    match = _SIZE.match(text)
    if match is None or match.group(2).upper() not in _UNITS:
        _bad("expert_cache", value, "give bytes ('24GB', '512MiB') or a share ('0.4', '40%')")
        raise AssertionError  # unreachable: _bad raises
    number, unit = match.group(1), match.group(2).upper()
    if not unit and "." in number:
        return float(number)
    return round(float(number) * _UNITS[unit])


def moe_options(options: Mapping[str, Any]) -> MoEOptions | None:
    """The :class:`MoEOptions` in backend ``options`` (None when ``expert_cache`` is unset:
    no offload). Other MoE options without ``expert_cache`` are an error: they would do
    nothing.
    """
    if options.get("expert_cache") is None:
        given = sorted(k for k in OPTION_NAMES if options.get(k) is not None)
        if given:
            msg = (f"{', '.join(given)} set without expert_cache: expert offload is off; set "
                   "expert_cache (e.g. '24GB' or 0.4) to offload the experts")
            raise ConfigError(msg)
        return None
    lookahead = options.get("lookahead", DEFAULT_LOOKAHEAD)
    if isinstance(lookahead, str) and lookahead.strip().isdigit():
        lookahead = int(lookahead)
    profile = options.get("moe_profile")
    return MoEOptions(
        expert_cache=parse_cache_size(options["expert_cache"]),
        plan=str(options.get("moe_plan") or "auto"),
        predictor=str(options.get("predictor") or "auto"),
        lookahead=lookahead,
        profile=None if profile is None else str(profile),
    )
