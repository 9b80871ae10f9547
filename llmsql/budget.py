"""Per-session settings (``SET llmsql.*``): the error policy, the query budgets and the
expert offload options (``SET llmsql.expert_cache = '24GB'``, :mod:`llmsql.moe.options`).

Budgets bound what one query may spend at the backend: ``max_calls`` (prompts sent),
``max_prompt_tokens``, ``max_output_tokens`` and ``max_cost_usd`` (with a price per model).
Answers from the result cache are free and never count. They are enforced in two places:

1. **Before a step sends anything**, its estimated need (the prompts not in the cache;
   prompt tokens at 4 characters per token, as EXPLAIN estimates them; one output token per
   prompt) is compared with what is left. A step that cannot fit stops before it spends.
2. **While it runs**, each batch is sent only as far as its *worst case* fits what is left
   (UTF-8 bytes plus a chat-template allowance bound prompt tokens; ``max_tokens`` bounds
   output tokens), so a budget is never overshot; the used amounts are the backend's own
   token counts.

Exceeding a budget raises :class:`~llmsql.errors.BudgetExceeded`, which names the budget,
the limit, what was used and how far the query got; every answered batch is already in the
result cache, so raising the budget and running again continues where it stopped.

**On Spark**, an LLM call's partitions are answered by independent tasks. Before the call
starts, :meth:`BudgetMeter.shares` splits what is left of every budget over the partitions
in proportion to their estimated size (prompts for ``max_calls`` and ``max_output_tokens``,
prompt characters for ``max_prompt_tokens``, both priced for ``max_cost_usd``); each task
meters its own share with the same two checks, reports what it spent, and the driver adds
it to the query's meter (:meth:`BudgetMeter.charge`). The shares add up to what was left,
so the query as a whole still never overshoots.

>>> s = apply_setting(Settings(), "max_calls", 100)
>>> s.budget.max_calls, apply_setting(s, "on_error", "fail").on_error
(100, 'fail')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from llmsql.errors import BudgetExceeded, ConfigError
from llmsql.moe.options import OPTION_NAMES, moe_options

if TYPE_CHECKING:
    from llmsql.backends.base import Request, Response

TEMPLATE_ALLOWANCE_TOKENS = 64
"""Tokens a chat template may add around a prompt (the worst-case bound adds this)."""

OnError = Literal["null", "fail"]
ON_ERROR_CHOICES: tuple[str, ...] = ("null", "fail")
BUDGET_NAMES: tuple[str, ...] = (
    "max_calls", "max_prompt_tokens", "max_output_tokens", "max_cost_usd",
)


@dataclass(frozen=True, slots=True)
class Budget:
    """Limits on what one query may spend at the backend (None: no limit)."""

    max_calls: int | None = None
    """Prompts sent to the backend (cache hits are free)."""
    max_prompt_tokens: int | None = None
    """Prompt tokens, as the backend counts them (chat template included)."""
    max_output_tokens: int | None = None
    """Generated tokens, as the backend counts them."""
    max_cost_usd: float | None = None
    """Dollars, from the model's price per million input and output tokens."""

    def active(self) -> bool:
        """Whether any limit is set."""
        return any(getattr(self, name) is not None for name in BUDGET_NAMES)


@dataclass(frozen=True, slots=True)
class Price:
    """A model's price in US dollars per million tokens."""

    input_usd_per_mtok: float
    output_usd_per_mtok: float

    def cost(self, prompt_tokens: float, output_tokens: float) -> float:
        """Dollars for these token counts.

        >>> Price(1.0, 2.0).cost(500_000, 250_000)
        1.0
        """
        return (prompt_tokens * self.input_usd_per_mtok
                + output_tokens * self.output_usd_per_mtok) / 1e6

    @staticmethod
    def parse(model: str, value: Any) -> Price:
        """From ``(input, output)`` or ``{"input": x, "output": y}`` (USD per 1M tokens).

        Raises:
            ConfigError: any other shape, or a negative price.
        """
        pair: Any = (value.get("input"), value.get("output")) if isinstance(value, Mapping) \
            else value
        try:
            inp, out = (float(x) for x in pair)
        except (TypeError, ValueError):
            msg = (
                f"price of model {model!r} must be (input, output) or {{'input': x, 'output': "
                f"y}} in USD per million tokens, not {value!r}"
            )
            raise ConfigError(msg) from None
        if inp < 0 or out < 0:
            msg = f"price of model {model!r} must not be negative"
            raise ConfigError(msg)
        return Price(inp, out)


@dataclass(frozen=True, slots=True)
class Settings:
    """What ``SET llmsql.<name> = <value>`` changes; kept by the session across queries."""

    on_error: OnError = "null"
    """``null``: a row whose call failed for good is NULL, counted, with its reason in
    ``last_errors()``; ``fail``: the query stops with an error (finished work stays cached)."""
    budget: Budget = Budget()
    cache: bool = True
    """Read and write the result cache (``SET llmsql.cache = false`` for this session)."""
    moe: tuple[tuple[str, Any], ...] = ()
    """Expert offload options set with ``SET llmsql.expert_cache`` (``moe_plan``,
    ``predictor``, ``lookahead``, ``moe_profile``), as (name, value) over the session's
    backend options; a None value removes that option (:mod:`llmsql.moe.options`)."""


SETTING_NAMES: tuple[str, ...] = ("on_error", "cache", *BUDGET_NAMES, *OPTION_NAMES)


def apply_setting(settings: Settings, name: str, value: Any, /) -> Settings:
    """Return ``settings`` with ``name`` set to ``value`` (None clears a budget).

    Raises:
        ConfigError: an unknown setting or a bad value.
    """
    key = name.lower()
    if key == "on_error":
        choice = str(value).lower() if value is not None else "null"
        if choice not in ON_ERROR_CHOICES:
            msg = f"llmsql.on_error must be 'null' or 'fail', not {value!r}"
            raise ConfigError(msg)
        return dataclasses.replace(settings, on_error=choice)  # type: ignore[arg-type]
    if key == "cache":
        return dataclasses.replace(settings, cache=_flag(value))
    if key in BUDGET_NAMES:
        limit = _limit(key, value)
        limits: dict[str, Any] = {**dataclasses.asdict(settings.budget), key: limit}
        return dataclasses.replace(settings, budget=Budget(**limits))
    if key in OPTION_NAMES:
        return dataclasses.replace(settings, moe=_moe_setting(settings.moe, key, value))
    raise ConfigError(
        f"unknown setting llmsql.{name}; the settings are: "
        + ", ".join(f"llmsql.{n}" for n in SETTING_NAMES)
    )


def _moe_setting(current: tuple[tuple[str, Any], ...], name: str, value: Any
                 ) -> tuple[tuple[str, Any], ...]:
    """``current`` with the MoE option ``name`` set to ``value`` (None, SQL's NULL, removes
    it; ``'none'`` is a predictor's name). Checked alone: the other options may follow in
    later statements; the whole set is checked when a model loads.
    """
    if value is not None:
        moe_options({"expert_cache": 1.0, name: value})
    return (*((k, v) for k, v in current if k != name), (name, value))


def _flag(value: Any) -> bool:
    text = str(value).lower()
    if isinstance(value, bool) or text in ("true", "false", "on", "off", "1", "0"):
        return value if isinstance(value, bool) else text in ("true", "on", "1")
    msg = f"llmsql.cache must be true or false, not {value!r}"
    raise ConfigError(msg)


def _limit(name: str, value: Any) -> int | float | None:
    if value is None or str(value).lower() in ("none", "null", ""):
        return None
    try:
        number = float(value) if name == "max_cost_usd" else int(str(value))
    except ValueError:
        number = -1
    if isinstance(value, bool) or number < 0:
        kind = "a non-negative number" if name == "max_cost_usd" else "a non-negative integer"
        msg = f"llmsql.{name} must be {kind} or NULL (no limit), not {value!r}"
        raise ConfigError(msg)
    return number


# ---- metering one query -------------------------------------------------------------------


@dataclass(slots=True)
class Usage:
    """What a query has spent at the backend so far."""

    calls: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    def value(self, name: str) -> float:
        """The used amount that budget ``name`` limits."""
        return {"max_calls": self.calls, "max_prompt_tokens": self.prompt_tokens,
                "max_output_tokens": self.output_tokens, "max_cost_usd": self.cost_usd}[name]


def prompt_bound(req: Request) -> int:
    """An upper bound on the prompt tokens of ``req``: every token holds at least one byte."""
    return len(req.prompt.encode("utf-8")) + TEMPLATE_ALLOWANCE_TOKENS


def output_bound(req: Request) -> int:
    """An upper bound on the output tokens of ``req`` (a choice costs its bytes + a stop)."""
    longest = max((len(c.encode("utf-8")) + 1 for c in req.choices or ()), default=0)
    return max(req.max_tokens, longest)


@dataclass(frozen=True, slots=True)
class PartSize:
    """The estimated size of one partition of an LLM call's inputs (budget shares)."""

    prompts: int
    """Distinct inputs: at most this many prompts."""
    prompt_tokens: int
    """Estimated prompt tokens (characters / 4)."""


class BudgetMeter:
    """Counts one query's spending and decides what may still be sent."""

    def __init__(self, budget: Budget, price_for: Callable[[str | None], Price | None], *,
                 scope: str | None = None) -> None:
        """Meter against ``budget``; ``price_for(model)`` gives a call's model price.

        ``scope`` names a share of a query's budget (a Spark partition's), for messages.
        """
        self.budget = budget
        self.used = Usage()
        self._price_for = price_for
        self.scope = scope

    def price(self, model: str | None) -> Price:
        """The price of ``model`` (zero when no cost budget is set).

        Raises:
            ConfigError: ``max_cost_usd`` is set and the model has no price.
        """
        price = self._price_for(model)
        if price is not None:
            return price
        if self.budget.max_cost_usd is None:
            return Price(0.0, 0.0)
        msg = (
            f"llmsql.max_cost_usd is set, but no price is known for model {model or 'default'!r}"
            f"; pass prices={{{model or 'default'!r}: (usd_per_1M_input, usd_per_1M_output)}} "
            "to llmsql.connect()"
        )
        raise ConfigError(msg)

    def _left(self) -> dict[str, float]:
        return {name: limit - self.used.value(name) for name in BUDGET_NAMES
                if (limit := getattr(self.budget, name)) is not None}

    def check_step(self, where: str, model: str | None, reqs: Sequence[Request]) -> None:
        """Refuse a step whose estimated need exceeds what is left, before it spends anything.

        Raises:
            BudgetExceeded: the estimate does not fit.
        """
        if not self.budget.active() or not reqs:
            return
        prompt = sum(max(1, len(r.prompt) // 4) for r in reqs)
        need = {"max_calls": len(reqs), "max_prompt_tokens": prompt,
                "max_output_tokens": len(reqs),
                "max_cost_usd": self.price(model).cost(prompt, len(reqs))}
        for name, left in self._left().items():
            if need[name] > left:
                raise self._error(
                    name, f"{where} needs about {amount(need[name])} ({len(reqs)} prompts not in "
                    f"the result cache) but only {amount(max(left, 0))} is left, so nothing of "
                    "it was sent"
                )

    def admit(self, model: str | None, reqs: Sequence[Request]) -> int:
        """How many leading ``reqs`` may be sent with their worst case inside every budget."""
        left = self._left()
        if not left:
            return len(reqs)
        price = self.price(model)
        total = {name: 0.0 for name in left}
        for n, req in enumerate(reqs):
            p, o = prompt_bound(req), output_bound(req)
            step = {"max_calls": 1, "max_prompt_tokens": p, "max_output_tokens": o,
                    "max_cost_usd": price.cost(p, o)}
            for name in left:
                total[name] += step[name]
                if total[name] > left[name]:
                    return n
        return len(reqs)

    def record(self, model: str | None, responses: Sequence[Response]) -> None:
        """Add what the backend reported for sent requests."""
        price = self.price(model)
        for r in responses:
            self.used.calls += 1
            self.used.prompt_tokens += r.prompt_tokens
            self.used.output_tokens += r.output_tokens
            self.used.cost_usd += price.cost(r.prompt_tokens, r.output_tokens)

    def blocked(self, model: str | None, req: Request) -> BudgetExceeded:
        """The error for a request whose worst case no longer fits."""
        price = self.price(model)
        p, o = prompt_bound(req), output_bound(req)
        step = {"max_calls": 1, "max_prompt_tokens": p, "max_output_tokens": o,
                "max_cost_usd": price.cost(p, o)}
        name = next((n for n, left in self._left().items() if step[n] > left), "max_calls")
        return self._error(
            name, f"the next prompt could need up to {amount(step[name])} but only "
            f"{amount(max(self._left()[name], 0))} is left"
        )

    def charge(self, usage: Usage, /) -> None:
        """Add what was spent elsewhere (a Spark task, metering its share) to this query."""
        self.used.calls += usage.calls
        self.used.prompt_tokens += usage.prompt_tokens
        self.used.output_tokens += usage.output_tokens
        self.used.cost_usd += usage.cost_usd

    def left(self) -> Budget:
        """What is left of every active budget (never negative; None where unlimited)."""
        left = {name: max(value, 0) for name, value in self._left().items()}

        def whole(name: str) -> int | None:
            return int(left[name]) if name in left else None

        cost = left.get("max_cost_usd")
        return Budget(max_calls=whole("max_calls"),
                      max_prompt_tokens=whole("max_prompt_tokens"),
                      max_output_tokens=whole("max_output_tokens"),
                      max_cost_usd=float(cost) if cost is not None else None)

    def shares(self, sizes: Sequence[PartSize], model: str | None) -> list[Budget]:
        """Split what is left of every budget over partitions, in proportion to ``sizes``.

        Calls and output tokens are split by prompts, prompt tokens by estimated tokens,
        dollars by the estimated cost; integer budgets are rounded down and the remainder
        goes to the largest fractions, so the shares add up to what is left.

        >>> meter = BudgetMeter(Budget(max_calls=10, max_prompt_tokens=1000), lambda m: None)
        >>> meter.used.calls = 3
        >>> [(b.max_calls, b.max_prompt_tokens)
        ...  for b in meter.shares([PartSize(4, 100), PartSize(2, 300)], None)]
        [(5, 250), (2, 750)]

        Raises:
            ConfigError: ``max_cost_usd`` is set and the model has no price.
        """
        price = self.price(model)
        weights: dict[str, list[float]] = {
            "max_calls": [s.prompts for s in sizes],
            "max_output_tokens": [s.prompts for s in sizes],
            "max_prompt_tokens": [s.prompt_tokens for s in sizes],
            "max_cost_usd": [price.cost(s.prompt_tokens, s.prompts) or s.prompt_tokens
                             for s in sizes],
        }
        left = self.left()
        split: dict[str, list[Any]] = {}
        for name in BUDGET_NAMES:
            total = getattr(left, name)
            if total is not None:
                split[name] = _split(total, weights[name], whole=name != "max_cost_usd")
        return [Budget(**{name: parts[i] for name, parts in split.items()})
                for i in range(len(sizes))]

    def _error(self, name: str, detail: str) -> BudgetExceeded:
        limit = getattr(self.budget, name)
        used = self.used.value(name)
        scope = f" ({self.scope})" if self.scope else ""
        return BudgetExceeded(
            f"budget llmsql.{name} = {amount(limit)}{scope}: {detail} ({amount(used)} used so far "
            f"in {'it' if self.scope else 'this query'})",
            budget=name, limit=float(limit), used=float(used),
        )


def _split(total: float, weights: Sequence[float], *, whole: bool) -> list[Any]:
    """``total`` in parts proportional to ``weights`` (equal parts when all are zero).

    >>> _split(10, [1, 1, 1], whole=True)
    [4, 3, 3]
    """
    if not weights:
        return []
    weight = float(sum(weights))
    exact = [total * w / weight for w in weights] if weight > 0 else \
        [total / len(weights)] * len(weights)
    if not whole:
        return exact
    parts = [int(x) for x in exact]
    by_fraction = sorted(range(len(exact)), key=lambda i: (parts[i] - exact[i], i))
    for i in by_fraction[: int(total) - sum(parts)]:
        parts[i] += 1
    return parts


def amount(x: float) -> str:
    """A budget amount as messages show it.

    >>> amount(1234), amount(0.125)
    ('1,234', '0.125')
    """
    return f"{x:,.4f}".rstrip("0").rstrip(".") if isinstance(x, float) and x != int(x) \
        else f"{int(x):,}"
