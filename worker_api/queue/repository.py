"""The queue's SQL. Every state change is one guarded statement whose WHERE clause
is the precondition, so concurrent requests and several API processes can never
move a job twice or backwards: the row count (or the RETURNING rows) says who won.

PostgreSQL locks candidate rows with ``FOR UPDATE SKIP LOCKED`` so that concurrent
pulls take different jobs; on SQLite every transaction starts with ``BEGIN
IMMEDIATE`` (``labcloud.db``), so the same statement runs alone under the write lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    ColumnElement,
    SQLColumnExpression,
    String,
    and_,
    case,
    cast,
    delete,
    exists,
    func,
    literal,
    not_,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from labcloud.contract import LEASED_STATUSES, JobStatus, QueueJob, allowed_sources
from worker_api.models import QueuedJob, StatusOutbox
from worker_api.queue.schemas import WorkerOffer

# ORM UPDATEs below return what changed; the session's identity map is refreshed
# from RETURNING instead of being evaluated in Python.
_UPDATE_OPTIONS: dict[str, Any] = {"synchronize_session": False, "populate_existing": True}


@dataclass(frozen=True, slots=True)
class StatusChange:
    """A status a job reached, to be told to the user API."""

    job_id: int
    status: JobStatus
    runtime_details: str | None


class QueueRepository:
    """Queries and guarded updates of ``queued_jobs`` and ``status_outbox``."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._dialect = session.get_bind().dialect.name

    # -- reads ---------------------------------------------------------------

    def get(self, queue_id: int) -> QueuedJob | None:
        return self._session.get(QueuedJob, queue_id, populate_existing=True)

    def get_by_job_id(self, job_id: int) -> QueuedJob | None:
        return self._session.scalars(
            select(QueuedJob)
            .where(QueuedJob.job_id == job_id)
            .execution_options(populate_existing=True)
        ).one_or_none()

    def leased_to(self, queue_id: int, worker: str) -> QueuedJob | None:
        """The job ``queue_id`` if ``worker`` currently holds it."""
        return self._session.scalars(
            select(QueuedJob)
            .where(
                QueuedJob.id == queue_id,
                QueuedJob.worker == worker,
                QueuedJob.status.in_(LEASED_STATUSES),
            )
            .execution_options(populate_existing=True)
        ).one_or_none()

    def jobs_leased_to(self, worker: str) -> Sequence[QueuedJob]:
        return self._session.scalars(
            select(QueuedJob)
            .where(QueuedJob.worker == worker, QueuedJob.status.in_(LEASED_STATUSES))
            .order_by(QueuedJob.id)
            .execution_options(populate_existing=True)
        ).all()

    # -- enqueue -------------------------------------------------------------

    def insert_if_absent(self, job: QueueJob, *, now: datetime) -> bool:
        """Insert ``job`` unless a row with its ``job_id`` exists; True when inserted.

        ``ON CONFLICT DO NOTHING`` keeps concurrent duplicates (a retried forward
        racing the original) from failing on the unique constraint."""
        hardware = job.job.hardware
        values: dict[str, Any] = {
            "job_id": job.job.meta.job_id,
            "spec": job.job.model_dump(mode="json"),
            "paths_upload": job.paths_upload.model_dump(mode="json"),
            "environment": job.environment.value if job.environment else None,
            "group_name": job.group,
            "priority": job.priority,
            "cpu_cores": hardware.cpu_cores,
            "memory": hardware.memory,
            "gpu_mem": hardware.gpu_mem,
            "gpu_model": hardware.gpu_model,
            "gpu_archi": hardware.gpu_archi,
            "status": JobStatus.QUEUED,
            "attempts": 0,
            "failed_workers": [],
            "created_at": now,
            "updated_at": now,
        }
        dialect_insert = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        statement = (
            dialect_insert(QueuedJob)
            .values(**values)
            .on_conflict_do_nothing(index_elements=[QueuedJob.job_id])
            .returning(QueuedJob.id)
        )
        return self._session.execute(statement).first() is not None

    # -- lease ---------------------------------------------------------------

    def lease(
        self,
        offer: WorkerOffer,
        *,
        limit: int,
        older_than: float,
        retry_different: bool,
        now: datetime,
        lease_until: datetime,
    ) -> list[QueuedJob]:
        """Lease up to ``limit`` matching queued jobs to ``offer.name`` in one
        statement; the jobs come back in pull order (priority, then age)."""
        job = QueuedJob
        conditions: list[ColumnElement[bool]] = [
            job.status == JobStatus.QUEUED,
            or_(
                job.environment == offer.environment.value,
                # A job for "anywhere" goes to any worker, but only once it has waited
                # older_than seconds for a worker of a preferred kind.
                and_(
                    job.environment.is_(None),
                    job.created_at <= now - timedelta(seconds=older_than),
                ),
            ),
            or_(job.cpu_cores.is_(None), job.cpu_cores <= offer.cpu_cores),
            or_(job.memory.is_(None), job.memory <= offer.memory),
            or_(job.gpu_mem.is_(None), job.gpu_mem <= offer.gpu_mem),
            _null_or_equal(job.gpu_model, offer.gpu_model),
            _null_or_equal(job.gpu_archi, offer.gpu_archi),
        ]
        if retry_different:
            conditions.append(not_(self._list_contains(job.failed_workers, literal(offer.name))))
        candidates = (
            select(job.id)
            .where(*conditions)
            .order_by(job.priority.desc(), job.created_at, job.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        statement = (
            update(job)
            .where(job.id.in_(candidates))
            .values(
                status=JobStatus.PULLED,
                worker=offer.name,
                lease_expires_at=lease_until,
                attempts=job.attempts + 1,
                updated_at=now,
            )
            .returning(job)
        )
        leased = list(self._session.scalars(statement, execution_options=_UPDATE_OPTIONS))
        leased.sort(key=lambda row: (-row.priority, row.created_at, row.id))
        return leased

    # -- status changes ------------------------------------------------------

    def renew(
        self,
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
        return self._session.execute(statement).first() is not None

    def transition(
        self,
        queue_id: int,
        *,
        worker: str,
        target: JobStatus,
        runtime_details: str | None,
        now: datetime,
        lease_until: datetime,
    ) -> StatusChange | None:
        """Move the job held by ``worker`` to ``target`` if the transition table
        allows it from its current status; None when the guard did not hold.

        ``queued`` is a hand-back: the worker lets go of the job, which does not count
        as a failed attempt. A terminal status ends the lease."""
        job = QueuedJob
        values: dict[str, Any] = {"status": target, "updated_at": now}
        if target in LEASED_STATUSES:
            values["lease_expires_at"] = lease_until
        elif target is JobStatus.QUEUED:
            values.update(
                worker=None,
                lease_expires_at=None,
                attempts=case((job.attempts > 0, job.attempts - 1), else_=0),
            )
        else:
            values["lease_expires_at"] = None
        if runtime_details is not None:
            values["runtime_details"] = runtime_details
        statement = (
            update(job)
            .where(
                job.id == queue_id,
                job.worker == worker,
                job.status.in_(allowed_sources(target)),
            )
            .values(**values)
            .returning(job.job_id, job.status, job.runtime_details)
        )
        row = self._session.execute(statement).first()
        return None if row is None else StatusChange(row[0], row[1], row[2])

    def cancel(self, job_id: int, *, now: datetime) -> bool:
        """Cancel the job with user API id ``job_id`` if it is still active."""
        statement = (
            update(QueuedJob)
            .where(
                QueuedJob.job_id == job_id,
                QueuedJob.status.in_(allowed_sources(JobStatus.CANCELED)),
            )
            .values(status=JobStatus.CANCELED, lease_expires_at=None, updated_at=now)
            .returning(QueuedJob.id)
        )
        return self._session.execute(statement).first() is not None

    def reap(self, *, now: datetime, max_retries: int, timeout: float) -> list[StatusChange]:
        """Take back every job whose lease expired: re-queue it while it has had at
        most ``max_retries`` attempts, fail it afterwards. The silent worker is
        remembered in ``failed_workers``."""
        job = QueuedJob
        give_up = job.attempts > max_retries
        silent_worker = func.coalesce(job.worker, "")
        attempts = cast(job.attempts, String)
        silence = (
            literal("worker ") + silent_worker + literal(f" sent no keep-alive for {timeout:g} s; ")
        )
        gave_up = silence + literal("giving up (silent attempts: ") + attempts + literal(")")
        requeued = (
            silence + literal("re-queued (attempt ") + attempts + literal(f" of {max_retries + 1})")
        )
        statement = (
            update(job)
            .where(job.status.in_(LEASED_STATUSES), job.lease_expires_at < now)
            .values(
                status=case(
                    (give_up, literal(JobStatus.ERROR.value)),
                    else_=literal(JobStatus.QUEUED.value),
                ),
                worker=None,
                lease_expires_at=None,
                failed_workers=case(
                    (self._list_contains(job.failed_workers, silent_worker), job.failed_workers),
                    else_=self._list_append(job.failed_workers, silent_worker),
                ),
                runtime_details=case((give_up, gave_up), else_=requeued),
                updated_at=now,
            )
            .returning(job.job_id, job.status, job.runtime_details)
        )
        return [StatusChange(row[0], row[1], row[2]) for row in self._session.execute(statement)]

    # -- outbox --------------------------------------------------------------

    def add_to_outbox(self, change: StatusChange, *, now: datetime) -> None:
        self._session.add(
            StatusOutbox(
                job_id=change.job_id,
                status=change.status,
                runtime_details=change.runtime_details,
                created_at=now,
            )
        )
        self._session.flush()

    def first_in_outbox(self) -> StatusOutbox | None:
        return self._session.scalars(
            select(StatusOutbox).order_by(StatusOutbox.id).limit(1)
        ).one_or_none()

    def remove_from_outbox(self, outbox_id: int) -> None:
        self._session.execute(delete(StatusOutbox).where(StatusOutbox.id == outbox_id))

    # -- JSON lists, per dialect --------------------------------------------

    def _list_contains(
        self, column: SQLColumnExpression[Any], value: SQLColumnExpression[Any]
    ) -> ColumnElement[bool]:
        if self._dialect == "postgresql":
            return cast(column, JSONB).op("@>", is_comparison=True)(func.jsonb_build_array(value))
        elements = func.json_each(column).table_valued("value")
        return exists().select_from(elements).where(elements.c.value == value)

    def _list_append(
        self, column: SQLColumnExpression[Any], value: SQLColumnExpression[Any]
    ) -> ColumnElement[Any]:
        if self._dialect == "postgresql":
            return cast(
                cast(column, JSONB).op("||", return_type=JSONB)(func.jsonb_build_array(value)),
                JSON,
            )
        return func.json_insert(column, "$[#]", value)


def _null_or_equal(
    column: SQLColumnExpression[str | None], offered: str | None
) -> ColumnElement[bool]:
    if offered is None:
        return column.is_(None)
    return or_(column.is_(None), column == offered)
