"""The worker API's check that a worker's account is still active: cached answers,
and failing open on a user API outage with the last known answer."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest

from worker_api.clients.accounts import AccountChecker

KEY = "internal-key"


class FakeUserApi:
    """Answers ``GET /_accounts/{subject}`` from ``accounts``; ``down`` makes every
    call fail as a refused connection, ``status`` replaces the answer's code."""

    def __init__(self) -> None:
        self.accounts: dict[str, bool] = {"w1": True}
        self.down = False
        self.status = 200
        self.calls: list[str] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request.url.path)
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        assert request.headers["x-api-key"] == KEY
        subject = request.url.path.removeprefix("/_accounts/")
        if self.status != 200:
            return httpx.Response(self.status, json={"detail": "no"})
        return httpx.Response(200, json={"active": self.accounts.get(subject, False)})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def api() -> FakeUserApi:
    return FakeUserApi()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_checker(api: FakeUserApi, clock: Clock, ttl: float) -> AccountChecker:
    return AccountChecker(
        user_api_url="http://user-api/",
        api_key=KEY,
        ttl_seconds=ttl,
        clock=clock,
        transport=httpx.MockTransport(api.handle),
    )


@pytest.fixture
def checker(api: FakeUserApi, clock: Clock) -> Iterator[AccountChecker]:
    checker = make_checker(api, clock, ttl=10)
    yield checker
    checker.close()


def test_answers_are_cached_for_the_ttl(
    checker: AccountChecker, api: FakeUserApi, clock: Clock
) -> None:
    assert checker.is_active("w1") is True
    api.accounts["w1"] = False  # disabled by an admin
    clock.now += 9.9
    assert checker.is_active("w1") is True  # still the cached answer
    assert api.calls == ["/_accounts/w1"]
    clock.now += 0.1
    assert checker.is_active("w1") is False
    assert checker.is_active("unknown") is False
    assert len(api.calls) == 3


def test_ttl_zero_asks_every_time(api: FakeUserApi, clock: Clock) -> None:
    checker = make_checker(api, clock, ttl=0)
    try:
        assert checker.is_active("w1") is True
        api.accounts["w1"] = False
        assert checker.is_active("w1") is False
        assert len(api.calls) == 2
    finally:
        checker.close()


def test_an_outage_uses_the_last_known_answer(
    checker: AccountChecker, api: FakeUserApi, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    api.accounts["gone"] = False
    assert checker.is_active("w1") is True
    assert checker.is_active("gone") is False
    api.down = True
    clock.now += 60
    with caplog.at_level(logging.WARNING, logger="worker_api.clients.accounts"):
        assert checker.is_active("w1") is True
        assert checker.is_active("gone") is False  # a disabled account stays refused
    assert "using the last answer: active" in caplog.text
    assert "using the last answer: disabled" in caplog.text
    # The failure is remembered for a TTL too: an outage costs one call per account.
    calls = len(api.calls)
    assert checker.is_active("w1") is True
    assert len(api.calls) == calls
    api.down = False
    api.accounts["w1"] = False
    clock.now += 10
    assert checker.is_active("w1") is False


def test_without_any_answer_it_fails_open(
    checker: AccountChecker, api: FakeUserApi, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    api.status = 404  # a user API without the route answers nothing usable either
    with caplog.at_level(logging.WARNING, logger="worker_api.clients.accounts"):
        assert checker.is_active("w1") is True
    assert "answered 404" in caplog.text
    assert "letting it in (no answer known)" in caplog.text
    api.down = True
    clock.now += 10
    assert checker.is_active("w1") is True
