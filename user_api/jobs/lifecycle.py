"""The one way a job's status changes in the user API.

``transition`` applies a move that ``ALLOWED_TRANSITIONS`` permits as one guarded
``UPDATE jobs ... WHERE status IN (...) RETURNING ...`` and then, in the same
transaction, everything that follows from the new status and its cause:

- a terminal status gives the owner's active-job slot back; the statement that does
  so returns the owner's address and email preference;
- a terminal status queues the completion email (not when the job is being deleted:
  there is no page left to announce), and marks the owner's storage count for a
  recount at its next check: the job's results were written by workers, outside
  the user API (``user_api.files.usage.note_job_ended``);
- a cancellation by the user or an administrator, or a deletion, withdraws the
  enqueue the worker API has not received yet, or else tells it to cancel the job.

A move the table does not allow (a duplicate, a late or backwards status) matches
no row and changes nothing: ``transition`` returns None. Callers: the worker API's
status updates, the user's cancel and delete (``jobs.service``), the admin cancel
(``admin.service``, which adds its audit entry), and the worker outbox giving up on
a job the worker API refused.

A terminal status update from the worker API with an email costs four statements:
the guarded update, the slot's update, the storage count's mark, the email's insert.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy.orm import Session

from labcloud.contract import FailureKind, JobStatus, Outcome
from labcloud.db import utcnow
from user_api.files.usage import note_job_deleted, note_job_ended
from user_api.jobs import repository
from user_api.jobs.repository import MovedJob
from user_api.jobs.watch import note_status_changed
from user_api.limits import release_active_job
from user_api.models import OutboxKind
from user_api.notifications.service import queue_completion_email
from user_api.notifications.templates import JobFacts

logger = logging.getLogger(__name__)


class Cause(StrEnum):
    """Why a job's status changes; decides what follows from the change."""

    # A status reported by the worker API (from a worker, or its own reaper).
    WORKER = "worker"
    USER_CANCEL = "user_cancel"
    ADMIN_CANCEL = "admin_cancel"
    # The owner deletes the job: an active one is canceled first, its outputs discarded.
    DELETE = "delete"
    # The worker API refused the job's enqueue for good; the worker outbox gives up.
    QUEUE_REFUSED = "queue_refused"

    @property
    def cancels(self) -> bool:
        """Whether the user API itself stops the job (the worker API must be told)."""
        return self in (Cause.USER_CANCEL, Cause.ADMIN_CANCEL, Cause.DELETE)


# The only status each cause other than WORKER may move a job to.
_TARGET: dict[Cause, JobStatus] = {
    Cause.USER_CANCEL: JobStatus.CANCELED,
    Cause.ADMIN_CANCEL: JobStatus.CANCELED,
    Cause.DELETE: JobStatus.CANCELED,
    Cause.QUEUE_REFUSED: JobStatus.ERROR,
}
# ``runtime_details`` when the caller gives none.
_DETAILS: dict[Cause, str] = {
    Cause.USER_CANCEL: "canceled by the user",
    Cause.ADMIN_CANCEL: "canceled by an administrator",
    Cause.DELETE: "deleted by the user",
}
# The outcome of a job the user API ends itself, when the caller gives none.
_FAILURE: dict[Cause, FailureKind] = {
    Cause.USER_CANCEL: FailureKind.CANCELED,
    Cause.ADMIN_CANCEL: FailureKind.CANCELED,
    Cause.DELETE: FailureKind.CANCELED,
    Cause.QUEUE_REFUSED: FailureKind.SYSTEM_ERROR,
}


@dataclass(frozen=True, slots=True)
class Transitioned:
    """A status change that happened."""

    job_id: int
    owner_id: int
    job_name: str
    status: JobStatus
    cause: Cause
    # Whether the change queued the completion email.
    email_queued: bool = False


def transition(
    session: Session,
    job_id: int,
    target: JobStatus,
    outcome: Outcome | None = None,
    *,
    cause: Cause,
    runtime_details: str | None = None,
) -> Transitioned | None:
    """Move job ``job_id`` to ``target`` if its current status allows it, with all
    that follows, in the caller's transaction; None when the move was not allowed
    (or there is no such job), in which case nothing was written (but for a job
    being deleted after it ended: its owner's storage count is marked for a recount).

    ``outcome`` (how the attempt ended) is stored with a terminal status; a job the
    user API ends itself gets one saying so when the caller gives none.
    ``runtime_details`` replaces the job's text when given, and is cleared when a
    job is queued or pulled again; cancellations have a default text."""
    required = _TARGET.get(cause)
    if required is not None and target is not required:
        raise ValueError(f"a {cause} moves a job to {required}, not {target}")
    now = utcnow()
    if runtime_details is None:
        runtime_details = _DETAILS.get(cause)
    if target.is_terminal and outcome is None and cause in _FAILURE:
        outcome = Outcome(failure=_FAILURE[cause], ended_at=now)
    moved = repository.move(session, job_id, target, _values(target, now, outcome, runtime_details))
    if moved is None:
        if cause is Cause.DELETE:
            # A job that had already ended is being deleted, its result folders too.
            note_job_deleted(session, job_id, now)
        return None
    note_status_changed(session, job_id)
    email_queued = False
    if target.is_terminal:  # every source of a terminal status is active: a slot frees
        owner = release_active_job(session, moved.user_id)
        note_job_ended(session, moved.user_id, now)
        if cause is not Cause.DELETE and owner.email_notifications:
            facts = _facts(moved, target, outcome)
            email_queued = queue_completion_email(session, facts, owner.email)
    if cause.cancels:
        _withdraw_from_worker(session, job_id, discard_outputs=cause is Cause.DELETE)
    if cause is Cause.WORKER:
        # "job N is now S": the line operators (and the end-to-end tests) follow.
        logger.info("job %s is now %s", job_id, target.value)
    else:
        logger.info("job %s %s (%s): %s", job_id, target.value, cause.value, runtime_details)
    return Transitioned(
        job_id=job_id,
        owner_id=moved.user_id,
        job_name=moved.job_name,
        status=target,
        cause=cause,
        email_queued=email_queued,
    )


def _values(
    target: JobStatus, now: datetime, outcome: Outcome | None, runtime_details: str | None
) -> dict[str, Any]:
    """The columns the move sets besides the status."""
    values: dict[str, Any] = {}
    # A job queued again (its worker was lost) or pulled anew starts a fresh text.
    if runtime_details is not None or target in (JobStatus.QUEUED, JobStatus.PULLED):
        values["runtime_details"] = runtime_details
    if target is JobStatus.PULLED:
        values["date_started"] = now
    if target.is_terminal:
        values["date_finished"] = now
        if outcome is not None:
            values["outcome"] = outcome.model_dump(mode="json")
    return values


def _withdraw_from_worker(session: Session, job_id: int, *, discard_outputs: bool) -> None:
    """Stop the job on the worker side. If the worker API never received it,
    withdrawing the enqueue is enough; otherwise it is told to cancel the job
    (``discard_outputs``: the job is being deleted, so its worker must not upload
    even the partial logs a canceled job keeps)."""
    if not repository.drop_pending_enqueue(session, job_id):
        repository.add_outbox(
            session, job_id, OutboxKind.CANCEL, {"discard_outputs": discard_outputs}
        )


def _facts(job: MovedJob, status: JobStatus, outcome: Outcome | None) -> JobFacts:
    application = job.application
    return JobFacts(
        id=job.id,
        name=job.job_name,
        application=str(application.get("application", "")),
        version=str(application.get("version", "")),
        entrypoint=str(application.get("entrypoint", "")),
        status=status,
        date_created=job.date_created,
        date_started=job.date_started,
        date_finished=job.date_finished,
        runtime_details=job.runtime_details,
        exit_code=outcome.exit_code if outcome is not None else None,
        failure=outcome.failure if outcome is not None else None,
    )
