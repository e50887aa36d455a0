"""SQL for the email outbox and the users' email preference.

Rows move ``pending`` -> ``sent`` | ``failed`` through guarded updates: a process
claims due rows by moving their ``next_attempt_at`` past a lease in one statement
that only takes rows still due, so several API processes never send the same email."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from user_api.models import EmailOutbox, EmailStatus, User


@dataclass(frozen=True, slots=True)
class ClaimedEmail:
    """A pending row this process now holds until ``lease_until``."""

    id: int
    job_id: int
    recipient: str
    subject: str
    html: str
    text: str
    attempts: int
    lease_until: datetime


def add_once(session: Session, values: dict[str, Any]) -> bool:
    """Insert an outbox row unless the job already has one; True if inserted.

    ``ON CONFLICT DO NOTHING`` rather than catching the unique violation: on
    PostgreSQL a failed statement would otherwise abort the caller's transaction,
    which is the one recording the job's status."""
    dialect = session.get_bind().dialect.name
    statement: postgresql.Insert | sqlite.Insert
    if dialect == "postgresql":
        statement = postgresql.insert(EmailOutbox).values(**values)
        statement = statement.on_conflict_do_nothing(index_elements=["job_id"])
    elif dialect == "sqlite":
        statement = sqlite.insert(EmailOutbox).values(**values)
        statement = statement.on_conflict_do_nothing(index_elements=["job_id"])
    else:
        raise NotImplementedError(f"the email outbox does not support {dialect}")
    result = session.execute(statement)
    return bool(result.rowcount)  # type: ignore[attr-defined]


def email_notifications(session: Session, user_id: int) -> bool:
    return bool(session.scalars(select(User.email_notifications).where(User.id == user_id)).one())


def set_email_notifications(session: Session, user_id: int, enabled: bool) -> None:
    session.execute(update(User).where(User.id == user_id).values(email_notifications=enabled))


def claim_due(
    session: Session, *, now: datetime, lease_until: datetime, limit: int
) -> list[ClaimedEmail]:
    """Take the oldest ``limit`` due pending rows (oldest first) until ``lease_until``;
    none when nothing is due. Rows another process leased meanwhile are no longer
    due, so the guard in the update itself decides who gets them."""
    outbox = EmailOutbox
    is_due = (outbox.status == EmailStatus.PENDING.value, outbox.next_attempt_at <= now)
    oldest = select(outbox.id).where(*is_due).order_by(outbox.id).limit(limit)
    rows = session.execute(
        update(outbox)
        .where(outbox.id.in_(oldest.scalar_subquery()), *is_due)
        .values(next_attempt_at=lease_until)
        .returning(
            outbox.id,
            outbox.job_id,
            outbox.recipient,
            outbox.subject,
            outbox.html,
            outbox.text,
            outbox.attempts,
        )
        .execution_options(synchronize_session=False)
    ).all()
    return sorted(
        (ClaimedEmail(*row, lease_until=lease_until) for row in rows), key=lambda email: email.id
    )


def release(session: Session, emails: Sequence[ClaimedEmail], *, due_at: datetime) -> None:
    """Let claimed rows go unsent: due again at ``due_at`` (not after their lease)."""
    for email in emails:
        session.execute(
            update(EmailOutbox)
            .where(
                EmailOutbox.id == email.id,
                EmailOutbox.status == EmailStatus.PENDING.value,
                EmailOutbox.next_attempt_at == email.lease_until,
            )
            .values(next_attempt_at=due_at)
            .execution_options(synchronize_session=False)
        )


def mark_sent(session: Session, email_id: int, *, at: datetime) -> None:
    _finish(session, email_id, status=EmailStatus.SENT, sent_at=at, last_error=None)


def mark_failed(session: Session, email_id: int, *, error: str) -> None:
    _finish(session, email_id, status=EmailStatus.FAILED, last_error=error[:2000])


def reschedule(session: Session, email_id: int, *, at: datetime, error: str) -> None:
    session.execute(
        update(EmailOutbox)
        .where(EmailOutbox.id == email_id, EmailOutbox.status == EmailStatus.PENDING.value)
        .values(attempts=EmailOutbox.attempts + 1, next_attempt_at=at, last_error=error[:2000])
        .execution_options(synchronize_session=False)
    )


def _finish(session: Session, email_id: int, *, status: EmailStatus, **values: Any) -> None:
    session.execute(
        update(EmailOutbox)
        .where(EmailOutbox.id == email_id, EmailOutbox.status == EmailStatus.PENDING.value)
        .values(status=status.value, attempts=EmailOutbox.attempts + 1, **values)
        .execution_options(synchronize_session=False)
    )
