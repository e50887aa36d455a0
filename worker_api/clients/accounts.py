"""Is a worker's account still active? Asked of the user API, which owns accounts.

A token stays valid until it expires, so without this check a disabled account's
workers could keep pulling jobs for hours, and a disabled user's signed URLs would
keep working. The user API answers ``GET /_accounts/{subject}`` with
``{"active": bool, "max_storage_bytes": int | null, "bytes_used": int | null,
"remaining_storage_bytes": int | null}`` (the limit in force, null for none: jobs'
results count against it; what the account's files take as the user API counts
them, and what is left); answers are cached for a few seconds
(``ACCOUNT_CHECK_TTL_SECONDS``) so that a busy worker does not cost one user API
call per request.

The checker is also the worker API's ``UsageLedger`` (``labcloud.storage.quota``):
an upload reserves its bytes against the last answer plus what this process has
reserved since, and once written reports them (``POST /_accounts/{subject}/usage``),
which the user API counts atomically and answers with the account's new state. A
report the user API does not take is kept and sent with the next one; the user API
also recounts the owner's files when the job ends. Two worker API processes check
against their own reservations only, so together they may pass the limit by what
one upload of each carries.

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
    its files have no limit (or the user API does not say); ``bytes_used`` and
    ``remaining_storage_bytes`` are None when the user API does not count them (no
    limit, a disabled account, or a user API from before the count)."""

    active: bool
    max_storage_bytes: int | None = None
    bytes_used: int | None = None
    remaining_storage_bytes: int | None = None

    @property
    def counted(self) -> bool:
        """Whether the user API counts the account's bytes (it takes reports)."""
        return self.bytes_used is not None


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
        # Bytes reserved by this process's uploads in progress, and bytes written
        # that the user API has not taken yet (sent with the next report), by subject.
        self._reserved: dict[str, int] = {}
        self._unreported: dict[str, int] = {}
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

    # -- storage usage (labcloud.storage.quota.UsageLedger) ---------------------------

    def _counted_used(self, subject: str) -> int:
        """Under the lock: the bytes the last answer counted, plus this process's
        reservations and unreported writes."""
        known = self._answers.get(subject)
        counted = known.info.bytes_used if known is not None and known.info is not None else None
        return (counted or 0) + self._reserved.get(subject, 0) + self._unreported.get(subject, 0)

    def used(self, subject: str) -> int:
        self.account(subject)  # an answer no older than the TTL
        with self._lock:
            return self._counted_used(subject)

    def remaining(self, subject: str, limit: int | None) -> int | None:
        """What ``subject`` may still store under ``limit`` (None: no limit), by the
        user API's count and this process's uploads since."""
        if limit is None:
            return None
        return max(0, limit - self.used(subject))

    def reserve(self, subject: str, nbytes: int, limit: int | None, *, open_ended: bool) -> bool:
        self.account(subject)
        with self._lock:
            after = self._counted_used(subject) + nbytes
            if limit is not None and (
                (open_ended and after >= limit) or (not open_ended and nbytes > 0 and after > limit)
            ):
                return False
            self._reserved[subject] = self._reserved.get(subject, 0) + nbytes
            return True

    def grow(self, subject: str, nbytes: int, limit: int | None) -> bool:
        with self._lock:
            if limit is not None and nbytes > 0 and self._counted_used(subject) + nbytes > limit:
                return False
            self._reserved[subject] = self._reserved.get(subject, 0) + nbytes
            return True

    def settle(self, subject: str, reserved: int, written: int | None) -> int:
        # Reported before the reservation is let go, so that no check in between
        # sees neither the reservation nor the count that includes the bytes.
        if written:
            self._report(subject, written)
        with self._lock:
            self._reserved[subject] = self._reserved.get(subject, 0) - reserved
            if not self._reserved[subject]:
                del self._reserved[subject]
            # A write that failed part way (written None) left what it left: the
            # user API recounts the owner's files when the job ends.
            return self._counted_used(subject)

    def adjust(self, subject: str, delta: int) -> int:
        if delta:
            self._report(subject, delta)
        with self._lock:
            return self._counted_used(subject)

    def expect_outside_writes(self, subject: str, *, expires_in: float) -> None:
        """Nothing to do here: what workers upload through presigned URLs is counted
        by the user API when the job ends."""

    def _report(self, subject: str, delta: int) -> None:
        """Tell the user API that ``delta`` bytes were written (with any earlier
        report it did not take), and keep its answer as the account's state."""
        with self._lock:
            total = delta + self._unreported.pop(subject, 0)
        try:
            info = self._send_usage(subject, total)
        except _NoAnswer as exc:
            with self._lock:
                self._unreported[subject] = self._unreported.get(subject, 0) + total
            logger.warning(
                "cannot report %d bytes written for %s to the user API (%s); "
                "counting them here and sending them with the next report",
                total,
                subject,
                exc,
            )
            return
        with self._lock:
            self._answers[subject] = _Answer(info, self._clock())

    def _send_usage(self, subject: str, delta: int) -> AccountInfo:
        try:
            response = self._client.post(
                f"{self._url}/_accounts/{quote(subject, safe='')}/usage",
                json={"bytes": delta},
                headers={INTERNAL_API_KEY_HEADER: self._api_key},
            )
        except httpx.HTTPError as exc:
            raise _NoAnswer(f"unreachable: {exc!r}") from exc
        return _account_info(response)

    def _ask(self, subject: str) -> AccountInfo:
        try:
            response = self._client.get(
                f"{self._url}/_accounts/{quote(subject, safe='')}",
                headers={INTERNAL_API_KEY_HEADER: self._api_key},
            )
        except httpx.HTTPError as exc:
            raise _NoAnswer(f"unreachable: {exc!r}") from exc
        return _account_info(response)


def _is_count(value: object) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


def _account_info(response: httpx.Response) -> AccountInfo:
    """The account's state in an answer of the user API's ``/_accounts`` routes."""
    if response.status_code != 200:
        raise _NoAnswer(f"it answered {response.status_code}")
    try:
        body = response.json()
        active = body["active"]
        # Older user APIs do not say: no limit (or no count) known.
        limit = body.get("max_storage_bytes")
        used = body.get("bytes_used")
        remaining = body.get("remaining_storage_bytes")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _NoAnswer(f"unexpected answer {response.text[:200]!r}") from exc
    if not isinstance(active, bool) or not all(_is_count(v) for v in (limit, used, remaining)):
        raise _NoAnswer(f"unexpected answer {response.text[:200]!r}")
    return AccountInfo(
        active=active, max_storage_bytes=limit, bytes_used=used, remaining_storage_bytes=remaining
    )


class _NoAnswer(Exception):
    """The user API gave no usable answer."""
