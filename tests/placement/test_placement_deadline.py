"""parse_deadline: durations, numbers, timestamps, and the errors for bad deadlines."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from llmsql.errors import PlanError
from llmsql.placement import parse_deadline

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("20m", 1200.0),
        ("90s", 90.0),
        ("1h30m", 5400.0),
        ("2h", 7200.0),
        ("1h 30m 15s", 5415.0),
        ("1.5h", 5400.0),
        ("00:20:00", 1200.0),
        ("01:02:03", 3723.0),
        ("600", 600.0),
        (600, 600.0),
        (2.5, 2.5),
        (timedelta(minutes=3), 180.0),
    ],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_deadline(value, now=NOW) == seconds


def test_timestamps_with_and_without_timezone() -> None:
    assert parse_deadline("2026-03-01T12:20:00+00:00", now=NOW) == 1200.0
    assert parse_deadline("2026-03-01T13:20:00+01:00", now=NOW) == 1200.0
    assert parse_deadline(NOW + timedelta(hours=1), now=NOW) == 3600.0
    east = timezone(timedelta(hours=5))
    assert parse_deadline(datetime(2026, 3, 1, 17, 10, tzinfo=east), now=NOW) == 600.0
    # naive = local time: ten minutes after a naive "now" is ten minutes away
    naive_now = datetime(2026, 3, 1, 12, 0, 0)
    assert parse_deadline("2026-03-01T12:10:00", now=naive_now) == 600.0
    # without `now`, a time an hour ahead is about an hour away
    ahead = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert 3590 < parse_deadline(ahead) <= 3600


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("soon", "not a duration or a time"),
        ("20x", "not a duration or a time"),
        ("", "empty"),
        ("0", "zero or negative"),
        (-5, "zero or negative"),
        ("0m", "zero or negative"),
        (timedelta(seconds=-1), "zero or negative"),
        (True, "boolean"),
        ([20], "not a time"),
        (float("nan"), "not a finite"),
        ("2026-03-01T11:00:00+00:00", "in the past"),
        (NOW - timedelta(seconds=1), "in the past"),
    ],
)
def test_bad_deadlines_say_what_and_give_an_example(value: object, words: str) -> None:
    with pytest.raises(PlanError, match=words) as info:
        parse_deadline(value, now=NOW)
    message = str(info.value)
    assert "20m" in message
