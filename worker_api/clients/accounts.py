"""Is a worker's account still active? Asked of the user API, which owns accounts.

A token stays valid until it expires, so without this check a disabled account's
workers could keep pulling jobs for hours, and a disabled user's signed URLs would
keep working. The user API answers ``GET /_accounts/{subject}`` with
``{"active": bool, "max_storage_bytes": int | null}`` (the limit in force, null for
none: jobs' results count against it); answers are cached for a few seconds
(``ACCOUNT_CHECK_TTL_SECONDS``) so that a busy worker does not cost one user API
call per request.

When the user API cannot answer, the check *fails open*: the last answer known for
that account is used, or the account is let in when none is known. Refusing every
worker during a user API outage would stop all running jobs from reporting and
uploading, for a protection that only matters in the rare minutes between an
account being disabled and the outage ending; an account disabled before the outage
stays refused, because that answer is cached. Each such decision is logged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

import httpx

from labcloud.contract import INTERNAL_API_KEY_HEADER

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AccountInfo:
    """What the user API says about an account. ``max_storage_bytes`` is None when
    its files have no limit (or the user API does not say)."""

    active: bool
    max_storage_bytes: int | None = None


# What is assumed of an account the user API never answered about (fail open).
_UNKNOWN = AccountInfo(active=True)


@dataclass(slots=True)
class _Answer:
    info: AccountInfo | None  # None: never answered
    checked_at: float


class AccountChecker:
    """Asks the user API whether accounts are active, caching answers for
    ``ttl_seconds`` (0: ask on every call). Blocking: use it from sync code."""

    def __init__(
        self,
        *,
        user_api_url: str,
        api_key: str,
        ttl_seconds: float,
        timeout_seconds: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._client = httpx.Client(timeout=timeout_seconds, transport=transport)
        self._url = user_api_url.rstrip("/")
        self._api_key = api_key
        self._ttl = ttl_seconds
        self._clock = clock
        self._answers: dict[str, _Answer] = {}
        self._lock = threading.Lock()

    def is_active(self, subject: str) -> bool:
        """Whether tokens of the account ``subject`` may be used."""
        return self.account(subject).active

    def account(self, subject: str) -> AccountInfo:
        """What the user API says about ``subject`` (cached; see the module
        docstring for what happens when it cannot answer)."""
        now = self._clock()
        with self._lock:
            known = self._answers.get(subject)
        if known is not None and now - known.checked_at < self._ttl:
            # A remembered failure without any known answer lets the account in.
            return known.info if known.info is not None else _UNKNOWN
        try:
            info = self._ask(subject)
        except _NoAnswer as exc:
            last = known.info if known is not None else None
            # Remember the failure too, so an outage costs one call per TTL per account.
            with self._lock:
                self._answers[subject] = _Answer(last, now)
            logger.warning(
                "cannot check account %s with the user API (%s); %s",
                subject,
                exc,
                "using the last answer: " + ("active" if last.active else "disabled")
                if last is not None
                else "letting it in (no answer known)",
            )
            return last if last is not None else _UNKNOWN
        with self._lock:
            self._answers[subject] = _Answer(info, now)
        return info

    def close(self) -> None:
        self._client.close()

    def _ask(self, subject: str) -> AccountInfo:
        try:
            response = self._client.get(
                f"{self._url}/_accounts/{quote(subject, safe='')}",
                headers={INTERNAL_API_KEY_HEADER: self._api_key},
            )
        except httpx.HTTPError as exc:
            raise _NoAnswer(f"unreachable: {exc!r}") from exc
        if response.status_code != 200:
            raise _NoAnswer(f"it answered {response.status_code}")
        try:
            body = response.json()
            active = body["active"]
            # Older user APIs do not say: no limit known.
            limit = body.get("max_storage_bytes")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise _NoAnswer(f"unexpected answer {response.text[:200]!r}") from exc
        if not isinstance(active, bool) or not (
            limit is None or (isinstance(limit, int) and not isinstance(limit, bool))
        ):
            raise _NoAnswer(f"unexpected answer {response.text[:200]!r}")
        return AccountInfo(active=active, max_storage_bytes=limit)


class _NoAnswer(Exception):
    """The user API gave no usable answer."""
