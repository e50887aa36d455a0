"""The one way a queued job changes status: ``transition``.

Every move of ``queued_jobs.status`` is one guarded ``UPDATE ... RETURNING`` whose
WHERE clause is the precondition: the statuses ``ALLOWED_TRANSITIONS`` allows the
target from (``allowed_sources``), plus what the cause of the move requires (the
reporting worker must hold the job; the reaper's re-queue must come from the pass
that took the job back). Concurrent requests and several API processes can thus
never move a job twice or backwards: the RETURNING rows say who won. In the same
statement the lease is kept (worker, expiry, attempts), and in the same
transaction the status change is written to ``status_outbox`` for the user API
(``note_written(session, "status_outbox")`` wakes the relay on commit), carrying
the attempt's ``Outcome`` completed with the attempt number known here.

Who moves a job, and how (``Cause``):

- ``LEASE``: a worker's pull, ``queued`` -> ``pulled`` (``worker_api.queue.lease``);
- ``REPORT``: the worker holding the job reports a new status; ``queued`` is a
  hand-back that does not count as an attempt;
- ``CANCEL``: the user API cancels or deletes the job (it knows already: no outbox
  row);
- ``LOST``: the reaper gives up on a silent worker's job (``error``, outcome
  ``lost``);
- ``REQUEUE``: the reaper puts a job it took back into the queue again, once the
  failed attempt's partial results are gone (``worker_api.queue.reaper``).

The worker API enforces no time limit of its own: a job's ``timeout`` is the
runner's, which reports the result like any other end.

Statements are built once per shape and process and then only executed with new
parameters: composing the lease's statement costs more CPU than running it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Integer,
    Select,
    String,
    Text,
    Update,
    bindparam,
    case,
    func,
    insert,
    literal_column,
    update,
)
from sqlalchemy.orm import Session

from labcloud.contract import LEASED_STATUSES, JobStatus, Outcome, allowed_sources
from labcloud.db import UtcDateTime
from labcloud.outbox import note_written
from worker_api.models import QueuedJob, StatusOutbox
from worker_api.queue.repository import list_append, list_contains

# The outbox name the status relay wakes for (``labcloud.outbox``).
STATUS_OUTBOX = "status_outbox"
# What makes two selections' statements differ beyond their parameters.
Shape = tuple[object, ...]


class Cause(StrEnum):
    """Why a job moves; decides the guard beyond the transition table, the lease
    bookkeeping and whether the user API is told."""

    LEASE = "lease"
    REPORT = "report"
    CANCEL = "cancel"
    LOST = "lost"
    REQUEUE = "requeue"


@dataclass(frozen=True, slots=True)
class ByJobId:
    """A job named by its user API id (the user API's cancel)."""

    job_id: int


@dataclass(frozen=True, slots=True)
class Selection:
    """Jobs chosen by a query of queue ids (the lease's candidates).

    ``build`` is called only the first time a statement of this ``shape`` is
    needed; ``parameters`` are the query's bound values for this call."""

    shape: Shape
    build: Callable[[], Select[tuple[int]]]
    parameters: Mapping[str, Any]


JobRef = int | ByJobId | Selection

# ORM UPDATEs here return what changed; the session's identity map is refreshed
# from RETURNING instead of being evaluated in Python.
_UPDATE_OPTIONS: dict[str, Any] = {"synchronize_session": False, "populate_existing": True}
# Causes whose moves the user API hears about through the outbox.
_TOLD: frozenset[Cause] = frozenset({Cause.LEASE, Cause.REPORT, Cause.LOST, Cause.REQUEUE})
_statements: dict[tuple[str, Cause, JobStatus, Shape], Update] = {}


def transition(
    session: Session,
    ref: JobRef,
    target: JobStatus,
    outcome: Outcome | None = None,
    *,
    cause: Cause,
    now: datetime,
    worker: str | None = None,
    lease_until: datetime | None = None,
    runtime_details: str | None = None,
    log_upload_until: datetime | None = None,
    claimed_until: datetime | None = None,
) -> list[QueuedJob]:
    """Move the job(s) ``ref`` to ``target`` if the transition table and ``cause``
    allow it, with what follows in the same transaction; the jobs moved (none when
    the guard did not hold).

    What each cause needs: ``LEASE`` the new holder ``worker`` and ``lease_until``;
    ``REPORT`` the reporting ``worker`` (who must hold the job), ``lease_until``
    when the target is leased, and ``runtime_details`` (None keeps them);
    ``CANCEL`` ``log_upload_until``, until when the job's last worker may upload
    its log (None: not at all); ``LOST`` the silent ``worker`` and the reason as
    ``runtime_details``; ``REQUEUE`` ``claimed_until``, the hold of the reaper's
    pass that took the job back.

    ``outcome`` goes to the user API with a terminal status (ignored otherwise),
    its ``attempt`` set to the number of leases the job has had."""
    _check_arguments(
        cause, target, worker=worker, lease_until=lease_until, claimed_until=claimed_until
    )
    if isinstance(ref, Selection):
        ref_kind: Shape = ("selection", ref.shape)
        parameters: dict[str, Any] = dict(ref.parameters)
    else:
        ref_kind = ("job_id",) if isinstance(ref, ByJobId) else ("queue_id",)
        parameters = {"ref": ref.job_id if isinstance(ref, ByJobId) else ref}
    dialect = session.get_bind().dialect.name
    key = (dialect, cause, target, ref_kind)
    statement = _statements.get(key)
    if statement is None:
        statement = _statements[key] = _statement(dialect, cause, target, ref)
    parameters.update(
        move_now=now,
        move_worker=worker,
        move_lease_until=lease_until,
        move_runtime_details=runtime_details,
        move_log_upload_until=log_upload_until,
        move_claimed_until=claimed_until,
    )
    moved = list(session.scalars(statement, parameters, execution_options=_UPDATE_OPTIONS))
    if moved and cause in _TOLD:
        _tell_user_api(session, moved, outcome if target.is_terminal else None, now=now)
    return moved


def _check_arguments(
    cause: Cause,
    target: JobStatus,
    *,
    worker: str | None,
    lease_until: datetime | None,
    claimed_until: datetime | None,
) -> None:
    if cause in (Cause.LEASE, Cause.REPORT, Cause.LOST) and worker is None:
        raise ValueError(f"a {cause} names its worker")
    if cause is Cause.REQUEUE and claimed_until is None:
        raise ValueError(f"a {cause} names the hold of the pass that took the job back")
    if (cause is Cause.LEASE or target in LEASED_STATUSES) and lease_until is None:
        raise ValueError(f"a {cause} to {target} needs the lease's end")
    expected = {
        Cause.LEASE: JobStatus.PULLED,
        Cause.CANCEL: JobStatus.CANCELED,
        Cause.LOST: JobStatus.ERROR,
        Cause.REQUEUE: JobStatus.QUEUED,
    }.get(cause)
    if expected is not None and target is not expected:
        raise ValueError(f"a {cause} moves a job to {expected}, not {target}")


def _tell_user_api(
    session: Session, moved: Sequence[QueuedJob], outcome: Outcome | None, *, now: datetime
) -> None:
    """One outbox row per job moved, in one statement."""
    session.execute(
        insert(StatusOutbox),
        [
            {
                "job_id": job.job_id,
                "status": job.status,
                "runtime_details": job.runtime_details,
                "outcome": _completed(outcome, job),
                "created_at": now,
            }
            for job in moved
        ],
    )
    note_written(session, STATUS_OUTBOX)


def _completed(outcome: Outcome | None, job: QueuedJob) -> dict[str, Any] | None:
    """``outcome`` as stored, with the attempt number this API counted (the runner
    may not know that a lost worker ran the job before)."""
    if outcome is None:
        return None
    attempt = job.attempts if job.attempts >= 1 else None
    completed = outcome.model_copy(update={"attempt": attempt})
    return completed.model_dump(mode="json", exclude_none=True)


# -- the statements ----------------------------------------------------------------


def _statement(dialect: str, cause: Cause, target: JobStatus, ref: JobRef) -> Update:
    job = QueuedJob
    where: list[ColumnElement[bool]] = [_ref_condition(ref), _sources(target)]
    values: dict[str, Any] = {"status": target, "updated_at": _param("move_now", UtcDateTime())}
    if cause is Cause.LEASE:
        values.update(
            worker=_param("move_worker", String()),
            lease_expires_at=_param("move_lease_until", UtcDateTime()),
            attempts=job.attempts + 1,
            log_upload_until=None,
        )
    elif cause is Cause.REPORT:
        where.append(job.worker == _param("move_worker", String()))
        values.update(_lease_after_report(target))
        values["runtime_details"] = func.coalesce(
            _param("move_runtime_details", Text()), job.runtime_details
        )
    elif cause is Cause.CANCEL:
        # SET expressions see the row as it was: only a held job gets a window.
        values.update(
            lease_expires_at=None,
            log_upload_until=case(
                (
                    _sources_among(LEASED_STATUSES),
                    _param("move_log_upload_until", UtcDateTime()),
                ),
                else_=None,
            ),
        )
    elif cause is Cause.LOST:
        silent = _param("move_worker", String())
        where += [job.worker == silent, job.lease_expires_at < _param("move_now", UtcDateTime())]
        values.update(
            worker=None,
            lease_expires_at=None,
            failed_workers=case(
                (list_contains(dialect, job.failed_workers, silent), job.failed_workers),
                else_=list_append(dialect, job.failed_workers, silent),
            ),
            runtime_details=_param("move_runtime_details", Text()),
        )
    else:  # Cause.REQUEUE
        where += [
            job.worker.is_(None),
            job.lease_expires_at == _param("move_claimed_until", UtcDateTime()),
        ]
        values["lease_expires_at"] = None
    return update(job).where(*where).values(**values).returning(job)


def _lease_after_report(target: JobStatus) -> dict[str, Any]:
    """A worker's report keeps its lease alive; ``queued`` lets go of the job without
    counting the attempt; an end closes the lease."""
    job = QueuedJob
    if target in LEASED_STATUSES:
        return {"lease_expires_at": _param("move_lease_until", UtcDateTime())}
    if target is JobStatus.QUEUED:
        return {
            "worker": None,
            "lease_expires_at": None,
            "attempts": case((job.attempts > 0, job.attempts - 1), else_=0),
        }
    return {"lease_expires_at": None}


def _ref_condition(ref: JobRef) -> ColumnElement[bool]:
    job = QueuedJob
    if isinstance(ref, Selection):
        return job.id.in_(ref.build())
    column = job.job_id if isinstance(ref, ByJobId) else job.id
    return column == bindparam("ref", type_=Integer())


def _sources(target: JobStatus) -> ColumnElement[bool]:
    """The transition table's guard for ``target``, its statuses written as literals
    (a partial index's predicate is then provably implied, see the lease)."""
    return _sources_among(allowed_sources(target))


def _sources_among(statuses: frozenset[JobStatus]) -> ColumnElement[bool]:
    return QueuedJob.status.in_(
        [literal_column(f"'{status.value}'") for status in sorted(statuses)]
    )


def _param(name: str, type_: Any) -> Any:
    return bindparam(name, type_=type_)
