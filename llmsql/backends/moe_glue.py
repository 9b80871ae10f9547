"""Expert offload at the backend boundary: checking the MoE options of a backend spec,
loading a model with its experts offloaded, and EXPLAIN's plan line (issue 15).

The options themselves are :mod:`llmsql.moe.options`, the cost model :mod:`llmsql.moe.plan`,
the mechanism :mod:`llmsql.engine.moe`. This module is what the transformers backend
(:mod:`llmsql.backends.transformers`), the session's settings and EXPLAIN share: it imports
torch (through :mod:`llmsql.engine`) only inside :func:`load_model`.

>>> moe_backend_options("transformers", {"expert_cache": "40%", "lookahead": "3"}).lookahead
3
>>> moe_backend_options("vllm", {"expert_cache": 0.4})
Traceback (most recent call last):
...
llmsql.errors.ConfigError: expert_cache given for the vllm backend: ...
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from llmsql.errors import ConfigError
from llmsql.moe.options import OPTION_NAMES, MoEOptions, moe_options, profile_path
from llmsql.moe.plan import (
    NEXT_ROUTER_PRIOR,
    MoEShape,
    OffloadStats,
    check_slots,
    choose_plan,
    slots_for,
)

if TYPE_CHECKING:
    from pathlib import Path

    from transformers import PreTrainedModel

    from llmsql.backends.base import BackendSpec

MOE_BACKENDS: tuple[str, ...] = ("transformers",)
"""Backend kinds that run expert offload."""

NEXT_ROUTER_ACCURACY = NEXT_ROUTER_PRIOR
"""The prediction accuracy EXPLAIN assumes for the training-free next-router predictor (the
engine's prior, :data:`llmsql.moe.plan.NEXT_ROUTER_PRIOR`: an assumption, not a measurement;
``llmsql moe-profile`` measures a learned predictor's)."""



def given_options(options: Mapping[str, Any], /) -> list[str]:
    """The MoE option names set (not None) in ``options``, sorted."""
    return sorted(k for k in OPTION_NAMES if options.get(k) is not None)


def moe_backend_options(kind: str, options: Mapping[str, Any], /, *,
                        complete: bool = True) -> MoEOptions | None:
    """The checked MoE options of a ``kind`` backend's ``options`` (None: no offload).

    With ``complete=False`` (a ``SET`` that may come before ``SET llmsql.expert_cache``),
    options without ``expert_cache`` are only checked one by one.

    Raises:
        ConfigError: MoE options for a backend other than ``transformers``, a bad value, or
            (``complete``) MoE options without ``expert_cache``.
    """
    names = given_options(options)
    if not names:
        return None
    if kind not in MOE_BACKENDS:
        msg = (f"{', '.join(names)} given for the {kind} backend: expert offload runs on the "
               "transformers backend; pass backend='transformers' (CLI: --backend "
               f"transformers) or drop {', '.join(names)}")
        raise ConfigError(msg)
    if complete or options.get("expert_cache") is not None:
        return moe_options(options)
    for name in names:  # each value alone, with a stand-in cache
        moe_options({"expert_cache": 1.0, name: options[name]})
    return None


def model_shape(folder: str | os.PathLike[str], options: MoEOptions, *, dtype: str
                ) -> MoEShape:
    """The MoE shape of the model in ``folder`` (its ``config.json``, no torch), checked
    against ``options``: the cache must hold one layer's top-k experts.

    Raises:
        ConfigError: not a mixture-of-experts model (the message names the folder and says
            to drop ``expert_cache``), an unreadable config, or too small a cache.
    """
    shape = moe_shape(folder, dtype=dtype)
    check_slots(shape, slots_for(shape, options.expert_cache), options.expert_cache)
    return shape


def moe_shape(folder: str | os.PathLike[str], *, dtype: str = "bfloat16") -> MoEShape:
    """:meth:`MoEShape.from_model_dir`, its errors naming the folder.

    Raises:
        ConfigError: not a mixture-of-experts model, or an unreadable ``config.json``.
    """
    try:
        return MoEShape.from_model_dir(folder, dtype=dtype)
    except ConfigError as exc:
        msg = f"model {os.fspath(folder)}: {exc}"
        raise ConfigError(msg) from None


def shape_dtype(options: Mapping[str, Any], /) -> str:
    """The weight type the transformers backend loads with these options (``auto``:
    float32 on the CPU, bfloat16 on a GPU; an ``auto`` device counts as a GPU).
    """
    dtype = str(options.get("dtype") or "auto")
    if dtype != "auto":
        return dtype
    return "float32" if str(options.get("device") or "cpu") == "cpu" else "bfloat16"


def check_model(model: str | None, options: Mapping[str, Any], /) -> None:
    """Check a session's MoE options against its model, when its folder is on disk already
    (never converts the embedded model): a dense model or too small a cache fails here,
    before anything loads.

    Raises:
        ConfigError: as :func:`model_shape`.
    """
    from llmsql.models import local_model_folder

    moe = moe_options(options)
    folder = local_model_folder(model)
    if moe is not None and folder is not None:
        model_shape(folder, moe, dtype=shape_dtype(options))


# ---- loading -------------------------------------------------------------------------------


def load_model(path: Path, moe: MoEOptions | None, *, device: str, dtype: str
               ) -> tuple[PreTrainedModel, Any]:
    """The model in ``path`` ready to run on ``device``, and its expert offload handle (None
    without ``moe``). With ``moe`` the model is loaded on the CPU, then
    :func:`llmsql.engine.moe.offload_experts` moves all but the experts to ``device`` and
    keeps the experts in host memory, with a GPU cache of ``moe.expert_cache``.

    Raises:
        ConfigError: the model is not a supported mixture-of-experts model, or the cache is
            too small (checked on ``config.json`` before the weights load).
    """
    from llmsql.engine import load_model as load
    from llmsql.engine import resolve_dtype

    if moe is None:
        return load(path, device=device, dtype=dtype), None
    concrete = resolve_dtype(dtype, device)
    model_shape(path, moe, dtype=concrete)
    from llmsql.engine.moe import offload_experts

    model = load(path, device="cpu", dtype=concrete)
    return model, offload_experts(model, moe, device=device, model_dir=str(path))


def stats_delta(after: OffloadStats, before: OffloadStats | None, /) -> OffloadStats:
    """What the offload runtime measured between two of its cumulative snapshots.

    >>> a = OffloadStats(steps=3, needed=10, hits=4, plans=(("lru", 3),))
    >>> stats_delta(a, OffloadStats(steps=1, needed=4, hits=1, plans=(("lru", 1),)))
    ... # doctest: +NORMALIZE_WHITESPACE
    OffloadStats(steps=2, tokens=0, needed=6, hits=3, prefetched=0, prefetch_used=0,
                 bytes_h2d=0, wait_seconds=0.0, plans=(('lru', 2),))
    """
    if before is None:
        return after
    changes: dict[str, Any] = {
        f.name: getattr(after, f.name) - getattr(before, f.name)
        for f in dataclasses.fields(OffloadStats) if f.name != "plans"}
    earlier = dict(before.plans)
    changes["plans"] = tuple((p, n - earlier.get(p, 0)) for p, n in after.plans
                             if n - earlier.get(p, 0) > 0)
    return OffloadStats(**changes)


def backend_moe_stats(backend: Any, /) -> OffloadStats | None:
    """A backend's cumulative expert offload counters: its ``moe_stats()`` (None when it
    has none, or does not offload).
    """
    measure = getattr(backend, "moe_stats", None)
    return measure() if callable(measure) else None


def stats_sum(parts: Iterable[OffloadStats], /) -> OffloadStats:
    """Several measurements as one (e.g. a call's, over the Spark workers that ran it):
    counts add up; the rates (:attr:`~OffloadStats.hit_rate`, ...) follow from the sums.

    >>> a = OffloadStats(steps=1, needed=4, hits=1, plans=(("lru", 1),))
    >>> b = OffloadStats(steps=2, needed=6, hits=5, plans=(("lru", 1), ("predictive", 1)))
    >>> total = stats_sum([a, b])
    >>> total.needed, total.hits, total.hit_rate, total.plans
    (10, 6, 0.6, (('lru', 2), ('predictive', 1)))
    """
    changes: dict[str, Any] = {f.name: 0 for f in dataclasses.fields(OffloadStats)}
    plans: dict[str, int] = {}
    for part in parts:
        for name in changes:
            if name != "plans":
                changes[name] += getattr(part, name)
        for plan, steps in part.plans:
            plans[plan] = plans.get(plan, 0) + steps
    changes["wait_seconds"] = float(changes["wait_seconds"])
    changes["plans"] = tuple(plans.items())
    return OffloadStats(**changes)


def stats_split(stats: OffloadStats, weights: Sequence[int], /) -> list[OffloadStats]:
    """``stats`` shared out in proportion to ``weights`` (a merged engine batch's counters,
    per client batch by its requests): each count by largest remainder, so the parts'
    :func:`stats_sum` is ``stats`` again.

    >>> parts = stats_split(OffloadStats(steps=3, needed=10, hits=7, plans=(("lru", 3),)),
    ...                     [1, 2])
    >>> [(p.needed, p.hits, p.plans) for p in parts]
    [(3, 2, (('lru', 1),)), (7, 5, (('lru', 2),))]
    >>> stats_sum(parts).needed
    10
    """
    if len(weights) == 1:
        return [stats]
    weights = [max(w, 0) for w in weights] if sum(weights) > 0 else [1] * len(weights)
    total = sum(weights)
    columns: dict[str, list[Any]] = {}
    for f in dataclasses.fields(OffloadStats):
        value = getattr(stats, f.name)
        if f.name != "plans":
            columns[f.name] = (_apportion(value, weights) if isinstance(value, int)
                               else [value * w / total for w in weights])
    plans = [(plan, _apportion(steps, weights)) for plan, steps in stats.plans]
    return [OffloadStats(**{k: v[i] for k, v in columns.items()},
                         plans=tuple((p, n[i]) for p, n in plans if n[i] > 0))
            for i in range(len(weights))]


def _apportion(n: int, weights: Sequence[int]) -> list[int]:
    """``n`` in whole shares proportional to ``weights`` (positive sum), summing to ``n``."""
    total = sum(weights)
    out = [n * w // total for w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda i: -(n * weights[i] % total))
    for i in by_remainder[: n - sum(out)]:
        out[i] += 1
    return out


def stats_from_dict(data: Mapping[str, Any], /) -> OffloadStats:
    """:class:`OffloadStats` from its :func:`dataclasses.asdict` (after a JSON round trip,
    which turns ``plans`` into lists).

    >>> stats_from_dict({"steps": 2, "needed": 4, "plans": [["lru", 2]]}).plans
    (('lru', 2),)
    """
    names = {f.name for f in dataclasses.fields(OffloadStats)}
    values = {k: v for k, v in data.items() if k in names}
    values["plans"] = tuple((str(p), int(n)) for p, n in values.get("plans", ()))
    return OffloadStats(**values)


# ---- EXPLAIN -------------------------------------------------------------------------------


def profile_precision(path: Path, /) -> float | None:
    """The measured precision stored beside a routing profile (``<profile>.json``, as
    :func:`llmsql.engine.moe.learned.save_predictor` writes it) one MoE layer ahead; None
    when there is no readable figure.

    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "p.json").write_text('{"metrics": {"distances": [{"distance": 2, '
    ...     '"precision": 0.5}, {"distance": 1, "precision": 0.75}]}}')
    >>> profile_precision(folder / "p.pt"), profile_precision(folder / "missing.pt")
    (0.75, None)
    """
    try:
        data = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    metrics = data.get("metrics") if isinstance(data, Mapping) else None
    distances = metrics.get("distances") if isinstance(metrics, Mapping) else None
    numbered = [d for d in distances if isinstance(d, Mapping)
                and isinstance(d.get("distance"), int)] if isinstance(distances, list) else []
    if not numbered:
        return None
    value = min(numbered, key=lambda d: d["distance"]).get("precision")
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        return None
    return float(value)


def predictor_accuracy(folder: str | os.PathLike[str], options: MoEOptions
                       ) -> tuple[float, str]:
    """The prediction accuracy the cost model plans with, and where it comes from."""
    if options.plan == "lru" or options.predictor == "none":
        return 0.0, "predictor none"
    path = profile_path(options, folder)
    assert path is not None  # a folder is given
    if options.predictor in ("auto", "learned"):
        precision = profile_precision(path)
        if precision is not None:
            return precision, f"predictor learned, measured precision {precision:.0%} ({path})"
        if options.predictor == "learned":
            return 0.0, f"predictor learned, but no profile at {path}: run llmsql moe-profile"
    return NEXT_ROUTER_ACCURACY, (f"predictor next_router, accuracy {NEXT_ROUTER_ACCURACY:.0%} "
                                  "assumed")


def plan_line(spec: BackendSpec, *, rows: int, prompt_tokens: int) -> str | None:
    """EXPLAIN's expert-offload line for a call sending ``rows`` prompts of ``prompt_tokens``
    tokens in all on ``spec``'s backend (None without MoE options). A prefill step runs the
    backend's ``batch_size`` rows (16 by default) at the call's mean prompt length.

    Raises:
        ConfigError: as :func:`model_shape`.
    """
    from llmsql.models import local_model_folder

    options = dict(spec.options)
    moe = moe_backend_options(spec.kind, options)
    if moe is None:
        return None
    folder = local_model_folder(spec.model)
    if folder is None:
        return "moe: the model is not on disk yet, so no plan is estimated"
    shape = model_shape(folder, moe, dtype=shape_dtype(options))
    step_rows = min(max(rows, 1), batch_rows(options))
    tokens = max(1, round(step_rows * prompt_tokens / max(rows, 1)))
    accuracy, how = predictor_accuracy(folder, moe)
    est = choose_plan(shape, slots=slots_for(shape, moe.expert_cache), tokens=tokens,
                      accuracy=accuracy, lookahead=moe.lookahead, plan=moe.plan)
    return f"{est.describe()}; {how}, lookahead {moe.lookahead}"


def batch_rows(options: Mapping[str, Any]) -> int:
    """The transformers backend's rows per engine step: its ``batch_size`` option (16 by
    default, also for a value the backend itself will refuse).
    """
    value = options.get("batch_size")
    try:
        return max(1, int(value)) if value is not None else 16
    except (TypeError, ValueError):
        return 16
