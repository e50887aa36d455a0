"""The queue's SQL. Every state change is one guarded statement whose WHERE clause
is the precondition, so concurrent requests and several API processes can never
move a job twice or backwards: the row count (or the RETURNING rows) says who won.

PostgreSQL locks candidate rows with ``FOR UPDATE SKIP LOCKED`` so that concurrent
pulls take different jobs; on SQLite every transaction starts with ``BEGIN
IMMEDIATE`` (``labcloud.db``), so the same statement runs alone under the write lock.

How a pull stays cheap however long the queue gets. A worker takes jobs of its own
environment, or jobs for "anywhere" once they are ``older_than`` seconds old. One
``WHERE environment = :env OR environment IS NULL`` cannot follow any index order,
so PostgreSQL would collect every queued match and sort it. The pull instead reads
two candidate lists, one per branch of the OR, each a walk of the partial index
``ix_queued_jobs_pull`` (queued rows only, ordered ``environment, priority DESC,
created_at, id``) that stops after ``limit`` matches, and leases the best
``limit`` of the two. ``environment`` leads the ORDER BY of each branch (a constant
there) because PostgreSQL treats ``IS NULL`` as no equality and would otherwise not
see that the index is already in ``priority, created_at, id`` order. ``status =
'queued'`` is written as a literal: a query with a bound parameter cannot prove the
partial index's predicate once psycopg's prepared statements switch to generic plans.

Plans seen with ``EXPLAIN (ANALYZE)`` on PostgreSQL 15 (2 cores), the lease of one
job, 300,000 finished/failed/cancelled rows and 2,000 running ones beside the queued
rows (a third each ``local``, ``cloud`` and "anywhere", priorities 0-5, a mix of
memory and GPU needs):

- the 0001 schema (index ``status, environment, priority DESC, created_at``, one OR
  query), 100,000 queued: BitmapOr of both branches, 41,558 rows fetched and
  sorted, 67 ms;
- this schema, 10 or 100,000 queued: the same plan, two Index Scans on
  ``ix_queued_jobs_pull`` under LockRows/Limit, each stopping at its first match,
  then a sort of the two candidates: 0.2-0.3 ms warm (up to 1 ms cold) at either
  depth; the whole lease seen from Python (BEGIN, statement, rows back) has a p50
  of 2-3 ms at both depths. On SQLite the plan is the same (two SEARCHes of
  ``ix_queued_jobs_pull``, a temporary B-tree only for the final few rows): 1 ms;
- the reaper (``lease_expires_at < now``) reads ``ix_queued_jobs_lease_expires_at``
  (0.05 ms), a worker's held jobs come from ``ix_queued_jobs_worker_status``
  (0.1 ms); finished rows are in neither.

A pull that offers no GPU reads ``ix_queued_jobs_pull_no_gpu`` instead, the same
line without the jobs that need a GPU: GPU jobs waiting for a GPU worker cost a
CPU worker nothing.

Both pull indexes carry the jobs' requirements (``cpu_cores, memory, gpu_mem,
gpus``; 0 when a job asks for nothing) after the order columns, and the pull
compares them with a plain ``<=``: PostgreSQL checks them on the index entries
(``Index Cond``) and reads a table row only for a job that fits.

What a pull still pays for: queued jobs ahead in line that this worker cannot run
are still passed one by one, on the index entries for the requirements above, on
the table rows for a GPU model or architecture it lacks or RETRY_DIFFERENT. A
worker behind 100,000 jobs that all need more memory than it has walks 100,000
index entries: 14-19 ms on PostgreSQL (36 ms when the rows had to be read), 20-24
ms on SQLite (53 ms). A cost in the depth of what the worker cannot take, never in
the finished history.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    ColumnElement,
    Integer,
    Row,
    SQLColumnExpression,
    String,
    Update,
    and_,
    bindparam,
    case,
    cast,
    delete,
    exists,
    func,
    literal,
    literal_column,
    not_,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from labcloud.contract import (
    LEASED_STATUSES,
    HardwareSpec,
    JobStatus,
    QueueJob,
    allowed_sources,
)
from labcloud.db import UtcDateTime
from worker_api.models import QueuedJob, StatusOutbox
from worker_api.queue.schemas import WorkerOffer

# ORM UPDATEs below return what changed; the session's identity map is refreshed
# from RETURNING instead of being evaluated in Python.
_UPDATE_OPTIONS: dict[str, Any] = {"synchronize_session": False, "populate_existing": True}
# The partial pull index's predicate, as a literal (see the module docstring).
_QUEUED: ColumnElement[str] = literal_column(f"'{JobStatus.QUEUED.value}'")
_NO_GPU: ColumnElement[int] = literal_column("0")
# Where the reaper may send a silent worker's job back to the queue: the leased
# statuses from which the state machine allows ``queued`` (not ``postprocessing``,
# whose results are partly uploaded). From the others it ends ``error``.
_REQUEUE_SOURCES: tuple[JobStatus, ...] = tuple(
    sorted(LEASED_STATUSES & allowed_sources(JobStatus.QUEUED))
)


def gpus_needed(hardware: HardwareSpec) -> int:
    """GPUs a job needs: its ``gpus``, and at least one when it asks for any GPU
    memory, model or architecture."""
    wants_gpu = bool(hardware.gpu_mem) or bool(hardware.gpu_model) or bool(hardware.gpu_archi)
    return max(hardware.gpus or 0, 1 if wants_gpu else 0)


@dataclass(frozen=True, slots=True)
class StatusChange:
    """A status a job reached, to be told to the user API."""

    job_id: int
    status: JobStatus
    runtime_details: str | None


@dataclass(frozen=True, slots=True)
class TakenBack:
    """A job ``reap`` took from its silent worker: held until ``claimed_until``
    while the partial results of the failed attempt (the folders of
    ``paths_upload``) are deleted, then re-queued."""

    queue_id: int
    job_id: int
    paths_upload: dict[str, str]
    claimed_until: datetime


@dataclass(slots=True)
class Reaped:
    """What one ``reap`` did: jobs failed (``error``), jobs taken back."""

    failed: list[StatusChange] = field(default_factory=list)
    taken_back: list[TakenBack] = field(default_factory=list)


class QueueRepository:
    """Queries and guarded updates of ``queued_jobs`` and ``status_outbox``."""

    # Lease statements by dialect and shape, shared by every repository.
    _lease_cache: ClassVar[dict[tuple[str, _LeaseShape], Update]] = {}

    def __init__(self, session: Session) -> None:
        self._session = session
        self._dialect = session.get_bind().dialect.name

    # -- reads ---------------------------------------------------------------

    def ping(self) -> None:
        self._session.execute(select(literal(1)))

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
        """Insert ``job`` unless a row with its ``job_id`` exists; True when inserted."""
        return self.insert_many_if_absent([job], now=now) == 1

    def insert_many_if_absent(self, jobs: Sequence[QueueJob], *, now: datetime) -> int:
        """Insert each of ``jobs`` whose ``job_id`` has no row yet, in one statement
        and in list order; returns how many were inserted.

        ``ON CONFLICT DO NOTHING`` keeps concurrent duplicates (a retried forward
        racing the original) from failing on the unique constraint."""
        if not jobs:
            return 0
        dialect_insert = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        statement = (
            dialect_insert(QueuedJob)
            .values([_row_values(job, now) for job in jobs])
            .on_conflict_do_nothing(index_elements=[QueuedJob.job_id])
            .returning(QueuedJob.id)
        )
        return len(self._session.execute(statement).all())

    def summaries_by_job_id(self, job_ids: Sequence[int]) -> Sequence[Row[int, int, JobStatus]]:
        """``(id, job_id, status)`` of the rows of these user API job ids."""
        return self._session.execute(
            select(QueuedJob.id, QueuedJob.job_id, QueuedJob.status)
            .where(QueuedJob.job_id.in_(job_ids))
            .order_by(QueuedJob.id)
        ).all()

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
        statement; the jobs come back in pull order (priority, then age).

        Each branch of the environment rule locks its own ``limit`` best candidates
        (see the module docstring); those not leased stay locked only until the
        transaction ends, a few milliseconds."""
        shape = _LeaseShape(
            retry_different=retry_different,
            gpu_model=offer.gpu_model is not None,
            gpu_archi=offer.gpu_archi is not None,
            no_gpu=offer.gpus == 0,
        )
        key = (self._dialect, shape)
        statement = self._lease_cache.get(key)
        if statement is None:
            statement = self._lease_cache[key] = self._lease_statement(shape)
        parameters = {
            "offer_environment": offer.environment.value,
            "offer_created_before": now - timedelta(seconds=older_than),
            "offer_cpu_cores": offer.cpu_cores,
            "offer_memory": offer.memory,
            "offer_gpus": offer.gpus,
            "offer_gpu_mem": offer.gpu_mem,
            "offer_gpu_model": offer.gpu_model,
            "offer_gpu_archi": offer.gpu_archi,
            "offer_worker": offer.name,
            "offer_limit": limit,
            "lease_now": now,
            "lease_until": lease_until,
        }
        leased = list(
            self._session.scalars(statement, parameters, execution_options=_UPDATE_OPTIONS)
        )
        leased.sort(key=lambda row: (-row.priority, row.created_at, row.id))
        return leased

    def _lease_statement(self, shape: _LeaseShape) -> Update:
        """The lease for pulls of one shape, with bound parameters for the offer.

        Built once per shape and process: composing it costs more CPU than running
        it on PostgreSQL."""
        job = QueuedJob
        worker = bindparam("offer_worker", type_=String())
        limit = bindparam("offer_limit", type_=Integer())
        fits: list[ColumnElement[bool]] = [
            # Plain comparisons (a job that asks for nothing says 0): the pull
            # index carries these columns and checks them on its entries.
            job.cpu_cores <= bindparam("offer_cpu_cores"),
            job.memory <= bindparam("offer_memory"),
            # gpus counts every job that needs a GPU, so a worker without a free GPU
            # (gpus=0) is never given one, whatever gpu_mem it reports. For such a
            # pull the condition is written as the literal of the partial index
            # ix_queued_jobs_pull_no_gpu, which the planner can then use.
            job.gpus == _NO_GPU if shape.no_gpu else job.gpus <= bindparam("offer_gpus"),
            job.gpu_mem <= bindparam("offer_gpu_mem"),
            _null_or_equal(job.gpu_model, "offer_gpu_model", offered=shape.gpu_model),
            _null_or_equal(job.gpu_archi, "offer_gpu_archi", offered=shape.gpu_archi),
        ]
        if shape.retry_different:
            fits.append(not_(self._list_contains(job.failed_workers, worker)))
        branches: list[tuple[ColumnElement[bool], ...]] = [
            (job.environment == bindparam("offer_environment"),),
            # A job for "anywhere" goes to any worker, but only once it has waited
            # older_than seconds for a worker of a preferred kind.
            (job.environment.is_(None), job.created_at <= bindparam("offer_created_before")),
        ]
        candidates = [
            select(job.id, job.priority, job.created_at)
            .where(job.status == _QUEUED, *where, *fits)
            .order_by(job.environment, job.priority.desc(), job.created_at, job.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
            .cte(f"lease_candidates_{index}")
            for index, where in enumerate(branches)
        ]
        pool = union_all(*(select(candidate) for candidate in candidates)).subquery("pool")
        chosen = (
            select(pool.c.id)
            .order_by(pool.c.priority.desc(), pool.c.created_at, pool.c.id)
            .limit(limit)
        )
        return (
            update(job)
            .where(job.id.in_(chosen))
            .values(
                status=JobStatus.PULLED,
                worker=worker,
                lease_expires_at=bindparam("lease_until", type_=UtcDateTime()),
                attempts=job.attempts + 1,
                log_upload_until=None,
                updated_at=bindparam("lease_now", type_=UtcDateTime()),
            )
            .returning(job)
        )

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

    def cancel(self, job_id: int, *, now: datetime, log_upload_until: datetime | None) -> bool:
        """Cancel the job with user API id ``job_id`` if it is still active.

        A job a worker held at that moment keeps that worker (its last assignee),
        who may upload the job's log until ``log_upload_until`` (``None``: not at
        all). The window is also closed on a job cancelled earlier, since a
        deletion that follows a cancellation discards what the first one kept."""
        job = QueuedJob
        window: ColumnElement[datetime | None] | None = None
        if log_upload_until is not None:
            # SET expressions see the row as it was: only a held job gets a window.
            window = case(
                (job.status.in_(LEASED_STATUSES), literal(log_upload_until, UtcDateTime())),
                else_=None,
            )
        cancelled = self._session.execute(
            update(job)
            .where(job.job_id == job_id, job.status.in_(allowed_sources(JobStatus.CANCELED)))
            .values(
                status=JobStatus.CANCELED,
                lease_expires_at=None,
                log_upload_until=window,
                updated_at=now,
            )
            .returning(job.id)
        ).first()
        if cancelled is None and log_upload_until is None:
            self._session.execute(
                update(job)
                .where(job.job_id == job_id, job.log_upload_until.is_not(None))
                .values(log_upload_until=None)
            )
        return cancelled is not None

    def log_upload_allowed(self, queue_id: int, worker: str, *, now: datetime) -> QueuedJob | None:
        """The cancelled job ``queue_id`` if ``worker`` held it last and may still
        upload its log."""
        job = QueuedJob
        return self._session.scalars(
            select(job)
            .where(
                job.id == queue_id,
                job.worker == worker,
                job.status == JobStatus.CANCELED,
                job.log_upload_until > now,
            )
            .execution_options(populate_existing=True)
        ).one_or_none()

    def reap(
        self, *, now: datetime, max_retries: int, timeout: float, cleanup_until: datetime
    ) -> Reaped:
        """Take every job whose lease expired away from its silent worker, with the
        move ``ALLOWED_TRANSITIONS`` allows from where the worker left it.

        A job that may go back to ``queued`` (it had not started uploading results)
        and has had at most ``max_retries`` attempts is *taken back*: its status
        stays, its worker is cleared (the silent worker's reports and file requests
        now get 404) and it is held until ``cleanup_until``, while the caller deletes
        the failed attempt's partial results and then calls ``requeue_taken_back``.
        Re-queueing only after that deletion is what keeps it from removing a new
        attempt's uploads: nobody can lease the job before. Any other job (attempts
        used up, or expired in ``postprocessing``, which may not move back) ends
        ``error`` with the reason.

        A job taken back earlier whose re-queue never came (the process died while
        deleting) is taken back again once ``cleanup_until`` passed; the decision
        and the reason written then stand. The silent worker is remembered in
        ``failed_workers``."""
        job = QueuedJob
        taken_back_earlier = job.worker.is_(None)
        give_up = and_(
            not_(taken_back_earlier),
            or_(job.status.not_in(_REQUEUE_SOURCES), job.attempts > max_retries),
        )
        attempt = cast(job.attempts, String)
        silence = (
            literal("worker ")
            + func.coalesce(job.worker, "")
            + literal(f" sent no keep-alive for {timeout:g} s (attempt ")
            + attempt
            + literal(f" of {max_retries + 1}, ")
            + cast(job.status, String)
            + literal(")")
        )
        reason = case(
            (taken_back_earlier, job.runtime_details),
            (
                job.status.not_in(_REQUEUE_SOURCES),
                silence
                + literal(
                    "; giving up: it had started uploading its results, so it is not run again"
                ),
            ),
            (job.attempts > max_retries, silence + literal("; giving up")),
            else_=silence
            + literal("; re-queued for attempt ")
            + cast(job.attempts + 1, String)
            + literal(f" of {max_retries + 1}"),
        )
        expired = (job.status.in_(LEASED_STATUSES), job.lease_expires_at < now)
        # Several worker API processes may reap at once: each takes the rows no
        # other holds, and the outer WHERE re-checks them once locked, so a job is
        # taken back once (a lease renewed meanwhile is no longer expired).
        claimable = select(job.id).where(*expired).with_for_update(skip_locked=True)
        silent_worker = job.worker
        statement = (
            update(job)
            .where(job.id.in_(claimable), *expired)
            .values(
                status=case((give_up, literal(JobStatus.ERROR.value)), else_=job.status),
                worker=None,
                lease_expires_at=case((give_up, None), else_=literal(cleanup_until, UtcDateTime())),
                failed_workers=case(
                    (
                        or_(
                            taken_back_earlier,
                            self._list_contains(job.failed_workers, silent_worker),
                        ),
                        job.failed_workers,
                    ),
                    else_=self._list_append(job.failed_workers, silent_worker),
                ),
                runtime_details=reason,
                updated_at=now,
            )
            .returning(
                job.id,
                job.job_id,
                job.status,
                job.runtime_details,
                job.paths_upload,
                job.lease_expires_at,
            )
        )
        reaped = Reaped()
        for queue_id, job_id, status, details, paths_upload, claimed_until in self._session.execute(
            statement
        ):
            if status is JobStatus.ERROR:
                reaped.failed.append(StatusChange(job_id, status, details))
            else:
                assert claimed_until is not None, "a job taken back is held until its cleanup"
                reaped.taken_back.append(
                    TakenBack(queue_id, job_id, dict(paths_upload), claimed_until)
                )
        return reaped

    def requeue_taken_back(
        self, queue_id: int, *, claimed_until: datetime, now: datetime
    ) -> StatusChange | None:
        """Put a job taken back by ``reap`` into the queue, if it is still held by
        that very pass (``claimed_until``): not cancelled meanwhile, and not taken
        back again by another process whose cleanup then runs. None otherwise."""
        job = QueuedJob
        row = self._session.execute(
            update(job)
            .where(
                job.id == queue_id,
                job.worker.is_(None),
                job.status.in_(_REQUEUE_SOURCES),
                job.lease_expires_at == claimed_until,
            )
            .values(status=JobStatus.QUEUED, lease_expires_at=None, updated_at=now)
            .returning(job.job_id, job.status, job.runtime_details)
        ).first()
        return None if row is None else StatusChange(row[0], row[1], row[2])

    def extend_leases(self, *, until: datetime) -> int:
        """Make every lease that ends before ``until`` end then; how many did.

        For a worker API that starts after an outage: its workers' keep-alives could
        not arrive, so their leases are not evidence that they went silent."""
        job = QueuedJob
        result = self._session.execute(
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

    def claim_first_in_outbox(self) -> StatusOutbox | None:
        """The first row of the outbox, locked until this transaction ends; None when
        the outbox is empty or another transaction holds its first row.

        Only the first row is ever claimed, never the next one, so that the changes
        of one job cannot overtake each other while several processes deliver."""
        outbox = StatusOutbox
        head = select(func.min(outbox.id)).scalar_subquery()
        return self._session.scalars(
            select(outbox).where(outbox.id == head).with_for_update(skip_locked=True)
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


@dataclass(frozen=True, slots=True)
class _LeaseShape:
    """What changes the text of a lease statement, beyond its parameters."""

    retry_different: bool
    gpu_model: bool
    gpu_archi: bool
    no_gpu: bool


def _null_or_equal(
    column: SQLColumnExpression[str | None], parameter: str, *, offered: bool
) -> ColumnElement[bool]:
    """The job asks for nothing, or for what the worker offers (if it says)."""
    if not offered:
        return column.is_(None)
    return or_(column.is_(None), column == bindparam(parameter, type_=String()))


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
