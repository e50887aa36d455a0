"""Completion emails: queued in the transaction that ends a job, and the users'
choice to receive them or not.

Whether emails are on, and the frontend the links point to, travel with every
session of the app (``Session.info``, set once by ``enable_completion_emails``):
the job lifecycle (``user_api.jobs.lifecycle``) calls ``queue_completion_email``
when a job ends without having to carry the email settings through every route."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from labcloud.outbox import note_written
from user_api.auth.service import AuthenticatedUser
from user_api.models import EmailOutbox
from user_api.notifications import repository
from user_api.notifications.schemas import NotificationSettings
from user_api.notifications.templates import JobFacts, render_completion_email

logger = logging.getLogger(__name__)

_INFO_KEY = "labcloud.completion_emails"


@dataclass(frozen=True, slots=True)
class CompletionEmails:
    """Settings of the completion emails that the enqueueing side needs."""

    frontend_url: str | None


def enable_completion_emails(sessions: sessionmaker[Session], config: CompletionEmails) -> None:
    """Make every session created by ``sessions`` queue completion emails."""
    info = dict(sessions.kw.get("info") or {})
    info[_INFO_KEY] = config
    sessions.configure(info=info)


def queue_completion_email(session: Session, job: JobFacts, recipient: str) -> bool:
    """Queue the email announcing that ``job`` ended to ``recipient``, in the
    caller's transaction (the one that ended the job).

    The caller has checked that the owner wants such emails. Nothing is written
    when emails are off, or when the job was already announced (the outbox holds one
    row per job). Returns True when a row was written; its commit wakes the sender."""
    config: CompletionEmails | None = session.info.get(_INFO_KEY)
    if config is None or not job.status.is_terminal:
        return False
    email = render_completion_email(job, frontend_url=config.frontend_url)
    added = repository.add_once(
        session,
        {
            "job_id": job.id,
            "recipient": recipient,
            "subject": email.subject,
            "html": email.html,
            "text": email.text,
        },
    )
    if added:
        note_written(session, EmailOutbox.__tablename__)
        logger.info("job %s: completion email to %s queued", job.id, recipient)
    return added


def get_notification_settings(session: Session, *, user: AuthenticatedUser) -> NotificationSettings:
    return NotificationSettings(
        email_notifications=repository.email_notifications(session, user.id)
    )


def update_notification_settings(
    session: Session, *, user: AuthenticatedUser, changes: NotificationSettings
) -> NotificationSettings:
    """Turn the caller's completion emails on or off. Emails already queued for
    jobs that ended before the change are still sent."""
    repository.set_email_notifications(session, user.id, changes.email_notifications)
    logger.info(
        "%s turned completion emails %s", user.email, "on" if changes.email_notifications else "off"
    )
    return get_notification_settings(session, user=user)
