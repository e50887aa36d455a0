"""SQL of the admin routes: accounts, jobs of every user, and the audit log (which
is only ever inserted into and read)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import String, cast, func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from labcloud.contract import ACTIVE_STATUSES, Group, JobStatus
from user_api.admin.schemas import AccountStatus
from user_api.models import AuditEntry, Job, User

_ACTIVE = [status.value for status in ACTIVE_STATUSES]


def _status_filter(status: AccountStatus) -> ColumnElement[bool]:
    if status is AccountStatus.DISABLED:
        return User.is_active.is_(False)
    if status is AccountStatus.PENDING:
        return User.is_active.is_(True) & User.is_approved.is_(False)
    return User.is_active.is_(True) & User.is_approved.is_(True)


def list_users(
    session: Session,
    *,
    search: str | None,
    status: AccountStatus | None,
    offset: int,
    limit: int,
) -> Sequence[User]:
    """Accounts in creation order, optionally those whose email contains ``search``
    (case-insensitive) and those in one ``status``."""
    query = select(User)
    if search:
        query = query.where(func.lower(User.email).contains(search.lower(), autoescape=True))
    if status is not None:
        query = query.where(_status_filter(status))
    return session.scalars(query.order_by(User.id).offset(offset).limit(limit)).all()


def active_job_counts(session: Session, user_ids: Sequence[int]) -> dict[int, int]:
    if not user_ids:
        return {}
    rows = session.execute(
        select(Job.user_id, func.count(Job.id))
        .where(Job.user_id.in_(user_ids), Job.status.in_(_ACTIVE))
        .group_by(Job.user_id)
    )
    return {user_id: count for user_id, count in rows}


def lock_admins(session: Session) -> list[User]:
    """The active accounts in group ``admins``, locked (PostgreSQL) so that two
    admins cannot each remove the other's rights at the same time."""
    # Groups are a JSON list; its text form contains the quoted name on every backend.
    in_admins = cast(User.groups, String).contains(f'"{Group.ADMINS.value}"')
    query = select(User).where(User.is_active.is_(True), in_admins).with_for_update()
    return [user for user in session.scalars(query) if Group.ADMINS.value in user.groups]


def add_audit_entry(
    session: Session, *, actor: str, action: str, target: str | None, details: dict[str, Any]
) -> AuditEntry:
    entry = AuditEntry(actor=actor, action=action, target=target, details=details)
    session.add(entry)
    session.flush()
    return entry


def list_audit_entries(session: Session, *, offset: int, limit: int) -> Sequence[AuditEntry]:
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).offset(offset).limit(limit)
    return session.scalars(query).all()


def job_counts_by_status(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.status, func.count(Job.id)).group_by(Job.status))
    return {status: count for status, count in rows}


def active_jobs_summary(session: Session) -> Sequence[tuple[str | None, dict[str, Any], str]]:
    """(environment, application, status) of every active job."""
    query = select(Job.environment, Job.application, Job.status).where(Job.status.in_(_ACTIVE))
    return [(env, app, status) for env, app, status in session.execute(query)]


def oldest_queued(session: Session) -> tuple[Job, str] | None:
    """The job waiting longest for a worker, with its owner's email."""
    query = (
        select(Job, User.email)
        .join(User, User.id == Job.user_id)
        .where(Job.status == JobStatus.QUEUED.value)
        .order_by(Job.date_created, Job.id)
        .limit(1)
    )
    row = session.execute(query).first()
    return (row[0], row[1]) if row is not None else None


def list_jobs(
    session: Session,
    *,
    status: JobStatus | None,
    user_id: int | None,
    offset: int,
    limit: int,
) -> Sequence[tuple[Job, str]]:
    """Any user's jobs, newest first, with their owners' emails."""
    query = select(Job, User.email).join(User, User.id == Job.user_id)
    if status is not None:
        query = query.where(Job.status == status.value)
    if user_id is not None:
        query = query.where(Job.user_id == user_id)
    query = query.order_by(Job.date_created.desc(), Job.id.desc()).offset(offset).limit(limit)
    return [(job, email) for job, email in session.execute(query)]


def owner_email(session: Session, job: Job) -> str:
    return session.scalars(select(User.email).where(User.id == job.user_id)).one()
