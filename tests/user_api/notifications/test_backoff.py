from __future__ import annotations

import email.utils
from datetime import UTC, datetime, timedelta

import pytest
import requests

from user_api.notifications.mailjet import parse_retry_after
from user_api.notifications.sender import backoff_delay


def _highest(low: float, high: float) -> float:
    return high


def _lowest(low: float, high: float) -> float:
    return low


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    highs = [backoff_delay(n, None, base=30, cap=3600, jitter=_highest) for n in range(1, 9)]
    assert highs == [30, 60, 120, 240, 480, 960, 1920, 3600]
    lows = [backoff_delay(n, None, base=30, cap=3600, jitter=_lowest) for n in range(1, 4)]
    assert lows == [15, 30, 60]
    assert backoff_delay(10_000, None, base=30, cap=3600, jitter=_highest) == 3600


def test_backoff_honours_retry_after_within_the_cap() -> None:
    assert backoff_delay(1, 90, base=30, cap=3600, jitter=_highest) == 90
    assert backoff_delay(4, 5, base=30, cap=3600, jitter=_highest) == 240
    assert backoff_delay(1, 7200, base=30, cap=3600, jitter=_highest) == 3600


def _response(retry_after: str | None) -> requests.Response:
    response = requests.Response()
    response.status_code = 429
    if retry_after is not None:
        response.headers["Retry-After"] = retry_after
    return response


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert parse_retry_after(_response("12")) == 12
    assert parse_retry_after(_response(None)) is None
    assert parse_retry_after(_response("soon")) is None
    when = datetime.now(UTC) + timedelta(seconds=120)
    parsed = parse_retry_after(_response(email.utils.format_datetime(when, usegmt=True)))
    assert parsed == pytest.approx(120, abs=2)
    past = datetime.now(UTC) - timedelta(hours=1)
    assert parse_retry_after(_response(email.utils.format_datetime(past, usegmt=True))) == 0
