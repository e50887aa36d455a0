"""The email outbox: completion emails, delivered by the outbox relay
(``labcloud.outbox.Relay``) under the name ``email_outbox``.

A round claims the oldest due row (moving its ``next_attempt_at`` past a lease,
``repository.claim_due``), sends it through the transport in a worker thread and
records the result. Rows are in the database, so a restarted API sends what was
pending; a sent row is never sent again. A send under way when the API stops is
waited for and recorded; a row claimed but not sent is let go, due at once. If a
process dies between sending and recording, the email is sent again (after the
lease on SQLite; at once on PostgreSQL, where the round's transaction rolls back):
the only case where an email may arrive twice.

Each row keeps its own retry schedule (``backoff_delay``, ``Retry-After``) and
gives up after the configured number of attempts; a refusal (bad credentials, a
request Mailjet refuses) ends it at once.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from datetime import timedelta
from typing import Protocol

from sqlalchemy.orm import Session, sessionmaker

from labcloud.db import utcnow
from labcloud.outbox import (
    Acknowledged,
    Backoff,
    Delivery,
    Failed,
    Rejected,
    Relay,
    Round,
)
from labcloud.threads import run_to_the_end
from user_api.models import EmailOutbox
from user_api.notifications import repository
from user_api.notifications.mailjet import (
    MailjetTransport,
    OutgoingEmail,
    SendOutcome,
    SendResult,
)
from user_api.notifications.repository import ClaimedEmail
from user_api.notifications.service import CompletionEmails, enable_completion_emails
from user_api.settings import EmailSenderService, UserApiSettings

logger = logging.getLogger(__name__)

NAME = EmailOutbox.__tablename__
# First retry delay; it doubles with each failed attempt up to the configured cap.
BASE_RETRY_SECONDS = 30.0
# Rows claimed per round. One: an email is recorded right after it is sent, which
# keeps the window in which a dying process makes an email arrive twice as short
# as one send.
BATCH_SIZE = 1


class MailTransport(Protocol):
    """Hands one email to a provider (blocking)."""

    def send(self, message: OutgoingEmail) -> SendResult: ...

    def close(self) -> None: ...


class CompletionEmailOutbox:
    """The email outbox's side of its relay (``labcloud.outbox.Outbox``)."""

    name = NAME

    def __init__(
        self,
        transport: MailTransport,
        *,
        max_attempts: int,
        retry_max_seconds: float,
        lease_seconds: float = 120.0,
        base_retry_seconds: float = BASE_RETRY_SECONDS,
        jitter: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self._transport = transport
        self._max_attempts = max_attempts
        self._retry_max = retry_max_seconds
        self._lease = timedelta(seconds=lease_seconds)
        self._base_retry = base_retry_seconds
        self._jitter = jitter

    def claim(self, session: Session) -> list[ClaimedEmail]:
        now = utcnow()
        return repository.claim_due(
            session, now=now, lease_until=now + self._lease, limit=BATCH_SIZE
        )

    async def send(self, batch: Round[ClaimedEmail]) -> None:
        for email in batch.claimed:
            message = OutgoingEmail(
                job_id=email.job_id,
                recipient=email.recipient,
                subject=email.subject,
                html=email.html,
                text=email.text,
            )
            # A send cannot be taken back: when the API stops meanwhile, it is
            # waited for and recorded, so that it is not sent again after the restart.
            delivery, stopping = await run_to_the_end(self._transport.send, message)
            result = self._judge(email, delivery)
            batch.record(result)
            if stopping is not None:
                raise stopping
            if isinstance(result, Failed):
                return

    def _judge(self, email: ClaimedEmail, delivery: SendResult) -> Delivery[ClaimedEmail]:
        if delivery.outcome is SendOutcome.SENT:
            return Acknowledged(email)
        if delivery.outcome is SendOutcome.REJECTED:
            logger.error(
                "job %s: completion email to %s rejected, not retried: %s",
                email.job_id,
                email.recipient,
                delivery.reason,
            )
            return Rejected(email, delivery.reason)
        attempt = email.attempts + 1
        if attempt >= self._max_attempts:
            logger.error(
                "job %s: completion email to %s given up after %d attempts: %s",
                email.job_id,
                email.recipient,
                attempt,
                delivery.reason,
            )
            return Rejected(email, delivery.reason)
        return Failed(email, delivery.reason, retry_after=delivery.retry_after)

    def settle(self, session: Session, batch: Round[ClaimedEmail]) -> None:
        now = utcnow()
        for email in batch.acknowledged:
            repository.mark_sent(session, email.id, at=now)
            logger.info("job %s: completion email sent to %s", email.job_id, email.recipient)
        for rejected in batch.rejected:
            repository.mark_failed(session, rejected.message.id, error=rejected.reason)
        if batch.failure is not None:
            email = batch.failure.message
            attempt = email.attempts + 1
            delay = backoff_delay(
                attempt,
                batch.failure.retry_after,
                base=self._base_retry,
                cap=self._retry_max,
                jitter=self._jitter,
            )
            repository.reschedule(
                session, email.id, at=now + timedelta(seconds=delay), error=batch.failure.reason
            )
            logger.warning(
                "job %s: completion email not sent (attempt %d of %d: %s); retrying in %.1f s",
                email.job_id,
                attempt,
                self._max_attempts,
                batch.failure.reason,
                delay,
            )
        repository.release(session, batch.unsent, due_at=now)


class EmailSender:
    """The email outbox's relay, and the transport it closes when it stops."""

    def __init__(self, relay: Relay[ClaimedEmail], transport: MailTransport) -> None:
        self.relay = relay
        self._transport = transport

    async def run(self) -> None:
        """Send until cancelled; a database or Mailjet outage only delays sending."""
        try:
            await self.relay.run()
        finally:
            self._transport.close()


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
    outbox = CompletionEmailOutbox(
        transport,
        max_attempts=settings.email_max_attempts,
        retry_max_seconds=settings.email_retry_max_seconds,
    )
    poll = settings.email_poll_seconds
    # Each row keeps its own schedule; while Mailjet fails, the next due email is
    # tried after at most one poll interval, as when idle.
    backoff = Backoff(first_seconds=min(0.1, poll), max_seconds=poll)
    return EmailSender(Relay(outbox, sessions, poll_seconds=poll, backoff=backoff), transport)
