"""Jobs: creation (resolve, then submit), listing, deletion, cancellation, and the
status updates that come back from the worker API. Every status change goes
through ``user_api.jobs.lifecycle``."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Sequence
from functools import partial

import anyio
import anyio.to_thread
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from labcloud.contract import (
    Environment,
    HardwareSpec,
    JobStatus,
    Outcome,
    OutputKind,
    StatusUpdate,
)
from labcloud.db import unit_of_work
from labcloud.errors import Conflict, NotFound
from labcloud.storage.base import Storage
from user_api.auth.service import AuthenticatedUser
from user_api.catalog.schemas import Catalog
from user_api.clients.worker_api import WorkerApiClient, WorkerApiError
from user_api.jobs import repository
from user_api.jobs.drafts import submit
from user_api.jobs.lifecycle import Cause, Transitioned, transition
from user_api.jobs.resolvers.catalog import resolve_from_catalog
from user_api.jobs.schemas import (
    ApplicationRef,
    JobAttributes,
    JobCreate,
    JobRead,
    JobWaiting,
    PathsOut,
    StatusApplied,
)
from user_api.jobs.watch import JOB_WATCH
from user_api.models import Job

logger = logging.getLogger(__name__)

# Most seconds GET /jobs/{id} waits for the worker API to say why a queued job
# waits; without an answer in time, ``waiting`` is null and the job answers anyway.
WAITING_ANSWER_SECONDS = 2.0


class JobNotFound(NotFound):
    """Job not found."""


class JobAlreadyEnded(Conflict):
    """The job has already ended."""


def create_job(
    session: Session,
    *,
    user: AuthenticatedUser,
    payload: JobCreate,
    catalog: Catalog,
    storage: Storage,
) -> JobRead:
    """Validate a job against the catalog and the user's files, store it as
    ``queued`` and write the enqueue message to the outbox (same transaction).
    Refused with ``ActiveJobLimitReached`` when the user's active jobs are at their
    limit.

    Everything slow (the catalog, storage look-ups, expanding folders) comes before
    the first statement: the session takes its connection, and on SQLite the
    database's write lock, only then (in ``submit``), so a large submission does not
    hold up other users' writes while it is checked."""
    draft = resolve_from_catalog(payload, subject=user.subject, catalog=catalog, storage=storage)
    job = submit(session, user, draft)
    ref = payload.application
    logger.info(
        "job %s created by %s: %s/%s/%s, %d input files",
        job.id,
        user.email,
        ref.application,
        ref.version,
        ref.entrypoint,
        len(draft.inputs),
    )
    return _read(job, user)


def list_jobs(
    session: Session,
    *,
    user: AuthenticatedUser,
    offset: int,
    limit: int,
    statuses: Collection[JobStatus] = (),
) -> list[JobRead]:
    """The user's jobs, newest first; only those in ``statuses`` when it is given."""
    jobs: Sequence[Job] = repository.list_for_user(
        session, user.id, offset=offset, limit=limit, statuses=statuses
    )
    return [_read(job, user) for job in jobs]


def get_job(session: Session, *, user: AuthenticatedUser, job_id: int) -> JobRead:
    return _read(_owned(session, user, job_id), user)


def read_job(factory: sessionmaker[Session], *, user: AuthenticatedUser, job_id: int) -> JobRead:
    """``get_job`` in a short transaction of its own."""
    with unit_of_work(factory) as session:
        return get_job(session, user=user, job_id=job_id)


async def wait_for_job(
    factory: sessionmaker[Session],
    *,
    user: AuthenticatedUser,
    job_id: int,
    wait: float,
    known: JobStatus | None,
    poll_seconds: float,
    max_waiting: int,
) -> JobRead:
    """The job once its status differs from ``known`` (default: its status now), or
    as it is after ``wait`` seconds; at once for a job that has ended. No
    connection or thread is held while waiting (``user_api.jobs.watch``)."""
    read = partial(read_job, factory, user=user, job_id=job_id)
    job = await anyio.to_thread.run_sync(read)
    known = job.status if known is None else known
    if wait <= 0 or job.status is not known or job.status.is_terminal:
        return job
    deadline = time.monotonic() + wait
    with JOB_WATCH.watching(job_id, max_waiting=max_waiting) as changed:
        while (left := deadline - time.monotonic()) > 0:
            with anyio.move_on_after(min(left, poll_seconds)):
                await changed.wait()
            changed.clear()
            job = await anyio.to_thread.run_sync(read)
            if job.status is not known:
                break
    return job


async def with_waiting(
    client: WorkerApiClient, job: JobRead, *, answer_within: float = WAITING_ANSWER_SECONDS
) -> JobRead:
    """``job`` with why it waits, when it is queued and the worker API says so in
    time. Never fails: a worker API that is down, slow or answers something else
    leaves ``waiting`` null. One request per job, so the list of jobs has none."""
    if job.status is not JobStatus.QUEUED:
        return job
    try:
        with anyio.fail_after(answer_within):
            body = await client.waiting(job.id, answer_within=answer_within)
        waiting = None if body is None else JobWaiting.model_validate(body)
    except (WorkerApiError, TimeoutError, ValidationError) as exc:
        logger.info("job %s: no waiting reason from the worker API (%s)", job.id, exc)
        return job
    return job.model_copy(update={"waiting": waiting})


def cancel_job(session: Session, *, user: AuthenticatedUser, job_id: int) -> JobRead:
    """Move an active job to ``canceled`` and tell the worker API; ``JobAlreadyEnded``
    (409) for a job that had already ended."""
    job = _owned(session, user, job_id)
    cancel(session, job, cause=Cause.USER_CANCEL)
    return _read(job, user)


def get_any_job(session: Session, *, job_id: int) -> Job:
    """Any user's job (for admins); ``JobNotFound`` when there is none."""
    job = repository.get(session, job_id)
    if job is None:
        raise JobNotFound(f"job {job_id} not found")
    return job


def cancel(session: Session, job: Job, *, cause: Cause) -> Transitioned:
    """Cancel the loaded ``job`` (by its owner or an administrator, as ``cause``
    says) and read it again; ``JobAlreadyEnded`` when it had already ended."""
    moved = transition(session, job.id, JobStatus.CANCELED, cause=cause)
    # Read again either way: the guarded update changed the row behind the loaded
    # object, or lost to a status that arrived since the job was loaded.
    session.refresh(job)
    if moved is None:
        raise JobAlreadyEnded(
            f"job {job.id} has already ended (status {job.status}): nothing to cancel"
        )
    return moved


def delete_job(session: Session, *, user: AuthenticatedUser, job_id: int, storage: Storage) -> None:
    """Cancel the job if it is active, then remove its row and its result folders."""
    job = _owned(session, user, job_id)
    transition(session, job.id, JobStatus.CANCELED, cause=Cause.DELETE)
    repository.delete_job(session, job.id)
    session.flush()
    # Files go last: if removing them fails, the transaction rolls back and the job
    # is still listed, so nothing is half-deleted from the user's point of view.
    for kind in OutputKind:
        storage.delete(f"{user.subject}/{kind.value}/{job.job_name}")
    logger.info("job %s deleted by %s", job.id, user.email)


def apply_status_update(session: Session, update: StatusUpdate) -> StatusApplied:
    """A status reported by the worker API. Illegal or repeated transitions are
    no-ops (the worker API may deliver a message twice); an unknown job is 404, which
    the worker API takes as "nothing to update". Only a no-op reads the job."""
    moved = transition(
        session,
        update.job_id,
        update.status,
        update.outcome,
        cause=Cause.WORKER,
        runtime_details=update.runtime_details,
    )
    if moved is None:
        current = repository.status_of(session, update.job_id)
        if current is None:
            raise JobNotFound(f"job {update.job_id} not found")
        logger.info(
            "job %s: ignored %s (current status %s)",
            update.job_id,
            update.status.value,
            current.value,
        )
    return StatusApplied(job_id=update.job_id, status=update.status, applied=moved is not None)


def _owned(session: Session, user: AuthenticatedUser, job_id: int) -> Job:
    job = repository.get_for_user(session, job_id, user.id)
    if job is None:  # another user's job is "not found" too: no existence oracle
        raise JobNotFound(f"job {job_id} not found")
    return job


def _read(job: Job, user: AuthenticatedUser) -> JobRead:
    return JobRead(
        id=job.id,
        job_name=job.job_name,
        environment=Environment(job.environment) if job.environment else None,
        priority=job.priority,
        application=ApplicationRef.model_validate(job.application),
        attributes=JobAttributes.model_validate(job.attributes),
        hardware=HardwareSpec.model_validate(job.hardware) if job.hardware else None,
        user_id=user.subject,
        user_email=user.email,
        status=JobStatus(job.status),
        date_created=job.date_created,
        date_started=job.date_started,
        date_finished=job.date_finished,
        runtime_details=job.runtime_details,
        outcome=Outcome.model_validate(job.outcome) if job.outcome else None,
        paths_out=PathsOut.model_validate(job.paths_out),
    )
