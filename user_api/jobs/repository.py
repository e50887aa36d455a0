"""SQL for jobs, and the writing side of the worker outbox (its relay reads and
deletes messages in ``user_api.jobs.outbox``). Status changes are guarded
compare-and-set updates: the row they return says whether the transition happened."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from labcloud.contract import JobStatus, allowed_sources
from labcloud.outbox import note_written
from user_api.models import JOBS, WORKER_OUTBOX, Job, OutboxKind, User, WorkerOutbox


@dataclass(frozen=True, slots=True)
class MovedJob:
    """A job as its guarded status update left it: what the consequences of the
    move (slot, completion email) need, returned by the update itself."""

    id: int
    user_id: int
    job_name: str
    application: dict[str, Any]
    date_created: datetime
    date_started: datetime | None
    date_finished: datetime | None
    runtime_details: str | None


def get_for_user(session: Session, job_id: int, user_id: int) -> Job | None:
    return session.scalars(select(Job).where(Job.id == job_id, Job.user_id == user_id)).first()


def get(session: Session, job_id: int) -> Job | None:
    return session.get(Job, job_id)


def list_for_user(
    session: Session,
    user_id: int,
    *,
    offset: int,
    limit: int,
    statuses: Collection[JobStatus] = (),
) -> Sequence[Job]:
    """Newest first; only jobs in ``statuses`` when it is not empty."""
    query = select(Job).where(Job.user_id == user_id)
    if statuses:
        query = query.where(Job.status.in_([status.value for status in statuses]))
    query = query.order_by(Job.date_created.desc(), Job.id.desc()).offset(offset).limit(limit)
    return session.scalars(query).all()


def has_job_named(session: Session, subject: str, job_name: str) -> bool:
    """Whether the account ``subject`` has a job called ``job_name``."""
    statement = (
        select(Job.id)
        .join(User, User.id == Job.user_id)
        .where(User.subject == subject, Job.job_name == job_name)
        .limit(1)
    )
    return session.scalar(statement) is not None


def status_of(session: Session, job_id: int) -> JobStatus | None:
    """The job's status; None when there is no such job."""
    status = session.scalar(select(JOBS.c.status).where(JOBS.c.id == job_id))
    return JobStatus(status) if status is not None else None


_MOVED_COLUMNS = tuple(JOBS.c[field] for field in MovedJob.__dataclass_fields__)


def move(
    session: Session, job_id: int, target: JobStatus, values: dict[str, Any]
) -> MovedJob | None:
    """Set ``status = target`` and ``values`` on the job if its current status may
    move to ``target`` (``allowed_sources``); None when it may not, or there is no
    such job. One statement, on the table: no object in the session is updated."""
    row = session.execute(
        update(JOBS)
        .where(
            JOBS.c.id == job_id,
            JOBS.c.status.in_([source.value for source in allowed_sources(target)]),
        )
        .values(status=target.value, **values)
        .returning(*_MOVED_COLUMNS)
    ).first()
    return MovedJob(*row) if row is not None else None


# Core statements on the tables (not the ORM entities) with the values passed as
# parameters: compiled once and cached, where the ORM's unit of work or an
# ``insert(Entity).values(...)`` would cost as much again on the hottest write path.
_INSERT_JOB = insert(JOBS).returning(JOBS.c.id)
_INSERT_OUTBOX = insert(WORKER_OUTBOX)
_JOB_COLUMNS = tuple(column.key for column in JOBS.columns if column.key != "id")


def insert_job(session: Session, job: Job) -> int:
    """Insert ``job`` (a transient object, never added to the session); returns its
    id. Nothing here needs the ORM's tracking of the new row."""
    values = {key: getattr(job, key) for key in _JOB_COLUMNS}
    return int(session.execute(_INSERT_JOB, values).scalar_one())


def delete_job(session: Session, job_id: int) -> None:
    session.execute(delete(Job).where(Job.id == job_id))


def add_outbox(
    session: Session, job_id: int, kind: OutboxKind, payload: dict[str, Any] | None
) -> None:
    """Write a message for the worker API; the commit of this transaction wakes the
    relays that deliver it (``labcloud.outbox``)."""
    session.execute(_INSERT_OUTBOX, {"job_id": job_id, "kind": kind.value, "payload": payload})
    note_written(session, WorkerOutbox.__tablename__)


def drop_pending_enqueue(session: Session, job_id: int) -> bool:
    """Withdraw an enqueue the worker API has not received yet; True if there was one."""
    result = session.execute(
        delete(WorkerOutbox).where(
            WorkerOutbox.job_id == job_id, WorkerOutbox.kind == OutboxKind.ENQUEUE.value
        )
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]
