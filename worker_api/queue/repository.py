"""The queue's SQL besides status changes (``worker_api.queue.lifecycle``), the
pull (``worker_api.queue.lease``) and the status outbox's delivery
(``worker_api.queue.status_relay``): reads, enqueueing, keep-alives, the reaper's
holds. Functions take the caller's ``Session``; the caller's
unit of work commits.

Writes are guarded statements whose WHERE clause is the precondition, so
concurrent requests and several API processes can never apply one twice: the row
count (or the RETURNING rows) says who won.

The reaper reads expired leases through ``ix_queued_jobs_lease_expires_at``
(0.05 ms on PostgreSQL 15 beside 300,000 finished rows) and a worker's held jobs
come from ``ix_queued_jobs_worker_status`` (0.1 ms); finished rows are in neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    ColumnElement,
    Row,
    SQLColumnExpression,
    String,
    case,
    cast,
    exists,
    func,
    literal,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from labcloud.contract import LEASED_STATUSES, HardwareSpec, JobStatus, QueueJob
from worker_api.models import QueuedJob

# -- reads ---------------------------------------------------------------------------


def ping(session: Session) -> None:
    session.execute(select(literal(1)))


def get(session: Session, queue_id: int) -> QueuedJob | None:
    return session.get(QueuedJob, queue_id, populate_existing=True)


def get_by_job_id(session: Session, job_id: int) -> QueuedJob | None:
    return session.scalars(
        select(QueuedJob)
        .where(QueuedJob.job_id == job_id)
        .execution_options(populate_existing=True)
    ).one_or_none()


def leased_to(session: Session, queue_id: int, worker: str) -> QueuedJob | None:
    """The job ``queue_id`` if ``worker`` currently holds it."""
    return session.scalars(
        select(QueuedJob)
        .where(
            QueuedJob.id == queue_id,
            QueuedJob.worker == worker,
            QueuedJob.status.in_(LEASED_STATUSES),
        )
        .execution_options(populate_existing=True)
    ).one_or_none()


def jobs_leased_to(session: Session, worker: str) -> Sequence[QueuedJob]:
    return session.scalars(
        select(QueuedJob)
        .where(QueuedJob.worker == worker, QueuedJob.status.in_(LEASED_STATUSES))
        .order_by(QueuedJob.id)
        .execution_options(populate_existing=True)
    ).all()


def log_upload_allowed(
    session: Session, queue_id: int, worker: str, *, now: datetime
) -> QueuedJob | None:
    """The cancelled job ``queue_id`` if ``worker`` held it last and may still
    upload its log."""
    job = QueuedJob
    return session.scalars(
        select(job)
        .where(
            job.id == queue_id,
            job.worker == worker,
            job.status == JobStatus.CANCELED,
            job.log_upload_until > now,
        )
        .execution_options(populate_existing=True)
    ).one_or_none()


def summaries_by_job_id(
    session: Session, job_ids: Sequence[int]
) -> Sequence[Row[int, int, JobStatus]]:
    """``(id, job_id, status)`` of the rows of these user API job ids."""
    return session.execute(
        select(QueuedJob.id, QueuedJob.job_id, QueuedJob.status)
        .where(QueuedJob.job_id.in_(job_ids))
        .order_by(QueuedJob.id)
    ).all()


# -- enqueue -------------------------------------------------------------------------


def gpus_needed(hardware: HardwareSpec) -> int:
    """GPUs a job needs: its ``gpus``, and at least one when it asks for any GPU
    memory, model or architecture."""
    wants_gpu = bool(hardware.gpu_mem) or bool(hardware.gpu_model) or bool(hardware.gpu_archi)
    return max(hardware.gpus or 0, 1 if wants_gpu else 0)


def insert_if_absent(session: Session, job: QueueJob, *, now: datetime) -> bool:
    """Insert ``job`` unless a row with its ``job_id`` exists; True when inserted."""
    return insert_many_if_absent(session, [job], now=now) == 1


def insert_many_if_absent(session: Session, jobs: Sequence[QueueJob], *, now: datetime) -> int:
    """Insert each of ``jobs`` whose ``job_id`` has no row yet, in one statement and
    in list order; returns how many were inserted.

    ``ON CONFLICT DO NOTHING`` keeps concurrent duplicates (a retried forward racing
    the original) from failing on the unique constraint."""
    if not jobs:
        return 0
    dialect = session.get_bind().dialect.name
    dialect_insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = (
        dialect_insert(QueuedJob)
        .values([_row_values(job, now) for job in jobs])
        .on_conflict_do_nothing(index_elements=[QueuedJob.job_id])
        .returning(QueuedJob.id)
    )
    return len(session.execute(statement).all())


def _row_values(job: QueueJob, now: datetime) -> dict[str, Any]:
    """The ``queued_jobs`` row of a newly enqueued job."""
    hardware = job.job.hardware
    return {
        "job_id": job.job.meta.job_id,
        "spec": job.job.model_dump(mode="json"),
        "paths_upload": job.paths_upload.model_dump(mode="json"),
        "environment": job.environment.value if job.environment else None,
        "group_name": job.group,
        "priority": job.priority,
        "cpu_cores": hardware.cpu_cores or 0,
        "memory": hardware.memory or 0,
        "gpu_mem": hardware.gpu_mem or 0,
        "gpu_model": hardware.gpu_model,
        "gpu_archi": hardware.gpu_archi,
        "gpus": gpus_needed(hardware),
        "status": JobStatus.QUEUED,
        "attempts": 0,
        "failed_workers": [],
        "created_at": now,
        "updated_at": now,
    }


# -- leases (no status change) --------------------------------------------------------


def renew(
    session: Session,
    queue_id: int,
    *,
    worker: str,
    status: JobStatus,
    runtime_details: str | None,
    now: datetime,
    lease_until: datetime,
) -> bool:
    """Keep-alive: extend the lease if ``worker`` holds the job in ``status``."""
    values: dict[str, Any] = {"lease_expires_at": lease_until, "updated_at": now}
    if runtime_details is not None:
        values["runtime_details"] = runtime_details
    statement = (
        update(QueuedJob)
        .where(
            QueuedJob.id == queue_id,
            QueuedJob.worker == worker,
            QueuedJob.status == status,
            QueuedJob.status.in_(LEASED_STATUSES),
        )
        .values(**values)
        .returning(QueuedJob.id)
    )
    return session.execute(statement).first() is not None


def close_log_window(session: Session, job_id: int) -> None:
    """No more log uploads for the job with user API id ``job_id`` (a deletion that
    follows a cancellation discards what the first one kept)."""
    session.execute(
        update(QueuedJob)
        .where(QueuedJob.job_id == job_id, QueuedJob.log_upload_until.is_not(None))
        .values(log_upload_until=None)
    )


@dataclass(frozen=True, slots=True)
class ExpiredLease:
    """A leased job whose worker sent no keep-alive in time, as the reaper found it.
    ``worker`` is None when an earlier pass already took the job back."""

    queue_id: int
    job_id: int
    status: JobStatus
    worker: str | None
    attempts: int
    runtime_details: str | None
    paths_upload: dict[str, str]


def claim_expired_leases(session: Session, *, now: datetime) -> list[ExpiredLease]:
    """The jobs whose lease ended before ``now``, locked until this transaction ends.

    Several worker API processes may reap at once: each takes the rows no other
    holds (``SKIP LOCKED``; PostgreSQL re-checks a row's expiry once it is locked,
    so a lease renewed meanwhile is not taken). SQLite runs one writer at a time."""
    job = QueuedJob
    rows = session.execute(
        select(
            job.id,
            job.job_id,
            job.status,
            job.worker,
            job.attempts,
            job.runtime_details,
            job.paths_upload,
        )
        .where(job.status.in_(LEASED_STATUSES), job.lease_expires_at < now)
        .order_by(job.id)
        .with_for_update(skip_locked=True)
    ).all()
    return [ExpiredLease(*row[:6], dict(row[6])) for row in rows]


def hold_for_cleanup(
    session: Session,
    expired: ExpiredLease,
    *,
    reason: str | None,
    until: datetime,
    now: datetime,
) -> bool:
    """Take ``expired`` from its silent worker without moving its status: nobody
    holds it until ``until`` (the worker's reports and file requests get 404, no
    pull can lease it) while the reaper deletes the partial results; the worker is
    remembered in ``failed_workers``. True when the row was still as read."""
    job = QueuedJob
    dialect = session.get_bind().dialect.name
    values: dict[str, Any] = {
        "worker": None,
        "lease_expires_at": until,
        "runtime_details": reason,
        "updated_at": now,
    }
    if expired.worker is not None:
        # Remembered once: a worker lost twice is one worker to avoid.
        silent = literal(expired.worker, String())
        values["failed_workers"] = case(
            (list_contains(dialect, job.failed_workers, silent), job.failed_workers),
            else_=list_append(dialect, job.failed_workers, silent),
        )
    held = session.execute(
        update(job)
        .where(
            job.id == expired.queue_id,
            job.status == expired.status,
            job.worker.is_(None) if expired.worker is None else job.worker == expired.worker,
            job.lease_expires_at < now,
        )
        .values(**values)
        .returning(job.id)
    ).first()
    return held is not None


def extend_leases(session: Session, *, until: datetime) -> int:
    """Make every lease that ends before ``until`` end then; how many did.

    For a worker API that starts after an outage: its workers' keep-alives could
    not arrive, so their leases are not evidence that they went silent."""
    job = QueuedJob
    result = session.execute(
        update(job)
        # A job taken back from its worker (worker NULL) holds no worker's lease:
        # its cleanup resumes as soon as its hold ends.
        .where(
            job.status.in_(LEASED_STATUSES),
            job.worker.is_not(None),
            job.lease_expires_at < until,
        )
        .values(lease_expires_at=until)
        .returning(job.id)
    )
    return len(result.all())


# -- JSON lists, per dialect ------------------------------------------------------------


def list_contains(
    dialect: str, column: SQLColumnExpression[Any], value: SQLColumnExpression[Any]
) -> ColumnElement[bool]:
    if dialect == "postgresql":
        return cast(column, JSONB).op("@>", is_comparison=True)(func.jsonb_build_array(value))
    elements = func.json_each(column).table_valued("value")
    return exists().select_from(elements).where(elements.c.value == value)


def list_append(
    dialect: str, column: SQLColumnExpression[Any], value: SQLColumnExpression[Any]
) -> ColumnElement[Any]:
    if dialect == "postgresql":
        return cast(
            cast(column, JSONB).op("||", return_type=JSONB)(func.jsonb_build_array(value)),
            JSON,
        )
    return func.json_insert(column, "$[#]", value)
