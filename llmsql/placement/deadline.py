"""Deadlines: ``"20m"``, ``"1h30m"``, ``90``, an ISO timestamp... -> seconds from now.

>>> parse_deadline("1h30m")
5400.0
>>> parse_deadline("00:20:00")
1200.0
>>> from datetime import datetime, timezone
>>> now = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
>>> parse_deadline("2026-01-01T12:20:00+00:00", now=now)
1200.0
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta

from llmsql.errors import PlanError

_EXAMPLE = (
    "write a duration like '20m', '90s', '1h30m', '00:20:00' or 1200 (seconds), "
    "or a time like '2026-01-01T18:00:00+00:00'"
)
_DURATION = re.compile(
    r"^(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m(?:in)?)?(?:(?P<s>\d+(?:\.\d+)?)s)?$"
)
_NUMBER = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?$")
_CLOCK = re.compile(r"^(?P<h>\d+):(?P<m>\d{1,2})(?::(?P<s>\d{1,2}(?:\.\d+)?))?$")


def _positive(seconds: float, shown: object) -> float:
    if not math.isfinite(seconds):
        msg = f"deadline {shown!r} is not a finite duration; {_EXAMPLE}"
        raise PlanError(msg)
    if seconds <= 0:
        msg = f"deadline {shown!r} is zero or negative ({seconds:g} s); {_EXAMPLE}"
        raise PlanError(msg)
    return float(seconds)


def _until(when: datetime, shown: object, now: datetime | None) -> float:
    when = when if when.tzinfo is not None else when.astimezone()  # naive = local time
    current = now if now is not None else datetime.now().astimezone()
    current = current if current.tzinfo is not None else current.astimezone()
    seconds = (when - current).total_seconds()
    if seconds <= 0:
        msg = (
            f"deadline {shown!r} is in the past ({-seconds:.0f} s ago, now is "
            f"{current.isoformat(timespec='seconds')}); give a later time or a duration like '20m'"
        )
        raise PlanError(msg)
    return seconds


def parse_deadline(value: object, *, now: datetime | None = None) -> float:
    """Seconds from ``now`` until the deadline ``value``.

    ``value``: a duration string (``"20m"``, ``"90s"``, ``"1h30m"``, ``"2h"``, ``"00:20:00"``),
    a number of seconds (int, float or numeric string), a :class:`~datetime.timedelta`, or a
    :class:`~datetime.datetime` / ISO-8601 string (with a timezone; a naive one is local time).
    ``now`` (for tests) defaults to the current time. Raises :class:`PlanError` for text that
    is not a deadline, for zero or negative durations and for times in the past.

    >>> parse_deadline("90s"), parse_deadline(45), parse_deadline(timedelta(minutes=2))
    (90.0, 45.0, 120.0)
    """
    if isinstance(value, bool):
        msg = f"deadline {value!r} is a boolean, not a time; {_EXAMPLE}"
        raise PlanError(msg)
    if isinstance(value, (int, float)):
        return _positive(float(value), value)
    if isinstance(value, timedelta):
        return _positive(value.total_seconds(), str(value))
    if isinstance(value, datetime):
        return _until(value, value.isoformat(), now)
    if not isinstance(value, str):
        msg = f"deadline {value!r} ({type(value).__name__}) is not a time; {_EXAMPLE}"
        raise PlanError(msg)
    return _parse_text(value, now)


def _parse_text(value: str, now: datetime | None) -> float:
    """``parse_deadline`` for text."""
    text = value.strip().lower().replace(" ", "")
    if not text:
        msg = f"deadline is empty; {_EXAMPLE}"
        raise PlanError(msg)
    if _NUMBER.match(text):
        return _positive(float(text), value)
    match = _DURATION.match(text)
    if match and any(match.group(k) for k in "hms"):
        parts = {k: float(match.group(k) or 0) for k in "hms"}
        return _positive(parts["h"] * 3600 + parts["m"] * 60 + parts["s"], value)
    match = _CLOCK.match(text)
    if match:
        h, m, s = (float(match.group(k) or 0) for k in "hms")
        return _positive(h * 3600 + m * 60 + s, value)
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        msg = f"deadline {value!r} is not a duration or a time; {_EXAMPLE}"
        raise PlanError(msg) from None
    return _until(when, value, now)
