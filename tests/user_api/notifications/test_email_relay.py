"""The email outbox's relay on a migrated database (SQLite and PostgreSQL), with a
transport standing in for Mailjet: what a shutdown does to a claimed email."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import insert, select
from sqlalchemy.orm import Session, sessionmaker

from labcloud.db import create_db_engine, make_session_factory, migrate, unit_of_work, utcnow
from labcloud.outbox import Backoff, Relay
from user_api.app import MIGRATIONS
from user_api.models import EmailOutbox, EmailStatus
from user_api.notifications import repository
from user_api.notifications.mailjet import OutgoingEmail, SendOutcome, SendResult
from user_api.notifications.sender import CompletionEmailOutbox, EmailSender


class RecordingTransport:
    """Accepts every email (the relay's logic under test, not Mailjet's)."""

    def __init__(self) -> None:
        self.subjects: list[str] = []
        self.closed = False

    def send(self, message: OutgoingEmail) -> SendResult:
        self.subjects.append(message.subject)
        return SendResult(SendOutcome.SENT)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = create_db_engine(database_url)
    migrate(engine, MIGRATIONS)
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()


def queue_email(sessions: sessionmaker[Session], job_id: int) -> None:
    with unit_of_work(sessions) as session:
        session.execute(
            insert(EmailOutbox).values(
                job_id=job_id,
                recipient="ada@example.org",
                subject=f"job {job_id} finished",
                html="<p>done</p>",
                text="done",
            )
        )


def rows(sessions: sessionmaker[Session]) -> list[tuple[str, int, bool]]:
    """Each row's status, attempts, and whether it is due now."""
    outbox = EmailOutbox
    with unit_of_work(sessions) as session:
        now = utcnow()
        found = session.execute(
            select(outbox.status, outbox.attempts, outbox.next_attempt_at).order_by(outbox.id)
        )
        return [(status, attempts, due <= now) for status, attempts, due in found]


def sender(sessions: sessionmaker[Session], transport: RecordingTransport) -> EmailSender:
    outbox = CompletionEmailOutbox(transport, max_attempts=3, retry_max_seconds=0.05)
    # Polling only every minute: only the start delivers.
    relay = Relay(outbox, sessions, poll_seconds=60, backoff=Backoff(0.01, 0.05))
    return EmailSender(relay, transport)


def test_a_shutdown_during_a_claim_lets_the_email_go_due_at_once(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API stops while its relay claims an email: the stop waits for the claim
    and lets the email go, instead of leaving it claimed, unsent, for the whole
    lease (two minutes in which a restarted API would not send it)."""
    queue_email(sessions, 7)
    claiming, release = threading.Event(), threading.Event()
    claim_due = repository.claim_due

    def slow_claim(*args: Any, **kwargs: Any) -> Any:
        claimed = claim_due(*args, **kwargs)
        claiming.set()
        assert release.wait(60)
        return claimed

    monkeypatch.setattr(repository, "claim_due", slow_claim)
    transport = RecordingTransport()

    async def stop_while_claiming() -> None:
        task = asyncio.ensure_future(sender(sessions, transport).run())
        assert await asyncio.to_thread(claiming.wait, 60)
        task.cancel()  # the API shuts down
        await asyncio.sleep(0.05)  # the task takes the cancellation
        assert not task.done()  # it waits for the claim
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(stop_while_claiming())
    assert transport.subjects == []
    assert transport.closed
    assert rows(sessions) == [(EmailStatus.PENDING.value, 0, True)]

    # The restarted API sends it on its first round.
    monkeypatch.setattr(repository, "claim_due", claim_due)
    restarted = RecordingTransport()

    async def restart() -> None:
        task = asyncio.ensure_future(sender(sessions, restarted).run())
        try:
            while not restarted.subjects:  # noqa: ASYNC110 (the transport has no event)
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(asyncio.wait_for(restart(), 60))
    assert restarted.subjects == ["job 7 finished"]
    assert [row[:2] for row in rows(sessions)] == [(EmailStatus.SENT.value, 1)]


def test_claims_take_due_rows_once_oldest_first(sessions: sessionmaker[Session]) -> None:
    for job_id in (1, 2, 3):
        queue_email(sessions, job_id)
    now = utcnow()
    lease = now.replace(year=now.year + 1)
    with unit_of_work(sessions) as session:
        first = repository.claim_due(session, now=now, lease_until=lease, limit=2)
    with unit_of_work(sessions) as session:
        second = repository.claim_due(session, now=now, lease_until=lease, limit=2)
        third = repository.claim_due(session, now=now, lease_until=lease, limit=2)
    assert [email.job_id for email in first] == [1, 2]
    assert [email.job_id for email in second] == [3]
    assert third == []
    with unit_of_work(sessions) as session:
        repository.release(session, first, due_at=now)
    assert [due for _status, _attempts, due in rows(sessions)] == [True, True, False]
