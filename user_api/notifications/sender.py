"""The background task that sends queued completion emails.

Each pass claims one due row at a time (a guarded update moving its
``next_attempt_at`` past a lease, see ``repository.claim_next``), sends it in a
worker thread and records the result in its own transaction. Rows are in the
database, so a restarted API sends what was pending; a sent row is never sent again.
If a process dies between claiming and recording, the lease expires and another
pass sends the email again: the only case where an email may arrive twice.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from datetime import timedelta
from typing import Protocol

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from labcloud.db import unit_of_work, utcnow
from labcloud.threads import run_to_completion
from user_api.notifications import repository
from user_api.notifications.mailjet import Delivery, MailjetTransport, Outcome, OutgoingEmail
from user_api.notifications.repository import ClaimedEmail
from user_api.notifications.service import CompletionEmails, enable_completion_emails
from user_api.settings import EmailSenderService, UserApiSettings

logger = logging.getLogger(__name__)

# First retry delay; it doubles with each failed attempt up to the configured cap.
BASE_RETRY_SECONDS = 30.0
# Rows read per claim: enough to find one that another process did not take first.
CLAIM_CANDIDATES = 5


class MailTransport(Protocol):
    """Hands one email to a provider (blocking)."""

    def send(self, message: OutgoingEmail) -> Delivery: ...

    def close(self) -> None: ...


class EmailSender:
    """Sends due outbox rows until cancelled."""

    def __init__(
        self,
        *,
        session_factory: sessionmaker[Session],
        transport: MailTransport,
        poll_seconds: float,
        max_attempts: int,
        retry_max_seconds: float,
        lease_seconds: float = 120.0,
        base_retry_seconds: float = BASE_RETRY_SECONDS,
        jitter: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self._sessions = session_factory
        self._transport = transport
        self._poll = poll_seconds
        self._max_attempts = max_attempts
        self._retry_max = retry_max_seconds
        self._lease = timedelta(seconds=lease_seconds)
        self._base_retry = base_retry_seconds
        self._jitter = jitter

    async def run(self) -> None:
        """Send forever (until cancelled); a database outage only delays sending."""
        try:
            while True:
                try:
                    while await self.send_next():
                        pass
                except SQLAlchemyError as exc:
                    logger.warning("email outbox unavailable (%s); retrying", exc)
                except Exception:  # the task must outlive any one bad pass
                    logger.exception("email sender: unexpected error; retrying")
                await asyncio.sleep(self._poll)
        finally:
            self._transport.close()

    async def send_next(self) -> bool:
        """Send one due email; False when none is due."""
        # Claiming, sending and recording the result are one step that a
        # cancellation (the API shutting down) waits for: an email handed to Mailjet
        # is then always recorded as sent and not sent again after the restart, and
        # one claimed just before the shutdown is not left claimed, unsent, for the
        # whole lease (the restarted API would wait that long to send it).
        return await run_to_completion(self._claim_and_deliver)

    def _claim_and_deliver(self) -> bool:
        claimed = self._claim()
        if claimed is None:
            return False
        self._deliver(claimed)
        return True

    def _deliver(self, email: ClaimedEmail) -> None:
        delivery = self._transport.send(
            OutgoingEmail(
                job_id=email.job_id,
                recipient=email.recipient,
                subject=email.subject,
                html=email.html,
                text=email.text,
            )
        )
        self._record(email, delivery)

    def _claim(self) -> ClaimedEmail | None:
        now = utcnow()
        with unit_of_work(self._sessions) as session:
            return repository.claim_next(
                session, now=now, lease_until=now + self._lease, candidates=CLAIM_CANDIDATES
            )

    def _record(self, email: ClaimedEmail, delivery: Delivery) -> None:
        attempt = email.attempts + 1
        with unit_of_work(self._sessions) as session:
            if delivery.outcome is Outcome.SENT:
                repository.mark_sent(session, email.id, at=utcnow())
                logger.info("job %s: completion email sent to %s", email.job_id, email.recipient)
            elif delivery.outcome is Outcome.REJECTED:
                repository.mark_failed(session, email.id, error=delivery.reason)
                logger.error(
                    "job %s: completion email to %s rejected, not retried: %s",
                    email.job_id,
                    email.recipient,
                    delivery.reason,
                )
            elif attempt >= self._max_attempts:
                repository.mark_failed(session, email.id, error=delivery.reason)
                logger.error(
                    "job %s: completion email to %s given up after %d attempts: %s",
                    email.job_id,
                    email.recipient,
                    attempt,
                    delivery.reason,
                )
            else:
                delay = backoff_delay(
                    attempt,
                    delivery.retry_after,
                    base=self._base_retry,
                    cap=self._retry_max,
                    jitter=self._jitter,
                )
                repository.reschedule(
                    session,
                    email.id,
                    at=utcnow() + timedelta(seconds=delay),
                    error=delivery.reason,
                )
                logger.warning(
                    "job %s: completion email not sent (attempt %d of %d: %s); retrying in %.1f s",
                    email.job_id,
                    attempt,
                    self._max_attempts,
                    delivery.reason,
                    delay,
                )


def backoff_delay(
    attempt: int,
    retry_after: float | None,
    *,
    base: float,
    cap: float,
    jitter: Callable[[float, float], float] = random.uniform,
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based).

    Exponential backoff with jitter (half fixed, half random, so that emails that
    failed together do not all come back together), at least what the server asked
    for with ``Retry-After``, and never more than ``cap``."""
    ceiling = min(cap, base * 2 ** min(attempt - 1, 32))
    delay = jitter(ceiling / 2, ceiling)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, cap)


def build_email_sender(
    settings: UserApiSettings, sessions: sessionmaker[Session]
) -> EmailSender | None:
    """The sender for the configured service, after making ``sessions`` queue
    completion emails; None (and nothing queued) when ``EMAIL_SENDER_SERVICE`` is empty."""
    if settings.email_sender_service is EmailSenderService.NONE:
        return None
    # Checked by the settings: the mailjet service has an address and both keys.
    assert settings.email_sender_address is not None
    assert settings.email_sender_api_key is not None
    assert settings.email_sender_secret_key is not None
    transport = MailjetTransport(
        api_url=settings.mailjet_api_url,
        api_key=settings.email_sender_api_key,
        secret_key=settings.email_sender_secret_key.get_secret_value(),
        sender_address=str(settings.email_sender_address),
    )
    enable_completion_emails(sessions, CompletionEmails(frontend_url=settings.frontend_url))
    return EmailSender(
        session_factory=sessions,
        transport=transport,
        poll_seconds=settings.email_poll_seconds,
        max_attempts=settings.email_max_attempts,
        retry_max_seconds=settings.email_retry_max_seconds,
    )
