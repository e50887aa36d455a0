"""The queue's rules: what a pull leases, which status reports are accepted, what a
cancellation keeps. No HTTP here; errors are domain errors. Functions take the
caller's ``Session``; the caller's unit of work commits.

Every status change goes through ``worker_api.queue.lifecycle.transition``, which
writes what the user API must hear to the status outbox in the same transaction,
so a change is never lost and never told before it is committed. The reaper is
``worker_api.queue.reaper``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import anyio
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from labcloud.contract import ALLOWED_TRANSITIONS, JobSpecs, JobStatus, Outcome, QueueJob
from labcloud.db import unit_of_work, utcnow
from labcloud.errors import Conflict, NotFound, Unavailable
from worker_api.models import QueuedJob
from worker_api.queue import repository
from worker_api.queue.lease import lease
from worker_api.queue.lifecycle import ByJobId, Cause, transition
from worker_api.queue.policy import QueuePolicy, QueueSignals, after_commit
from worker_api.queue.schemas import EnqueuedJob, WorkerOffer

_REPORT_ATTEMPTS = 3


class JobNotFound(NotFound):
    """No such job, or this worker does not hold it (any more)."""


class InvalidTransition(Conflict):
    """This status change is not allowed from the job's current status."""


class DatabaseUnavailable(Unavailable):
    """The queue database does not answer."""


@dataclass(frozen=True, slots=True)
class LeasedJob:
    """A job just leased to a worker: its queue id and what the worker runs."""

    queue_id: int
    spec: JobSpecs


def enqueue(session: Session, job: QueueJob, *, signals: QueueSignals) -> QueuedJob:
    """Add ``job`` to the queue, or return the existing row when a job with the same
    user API id is already there (the user API retries until it hears back)."""
    if repository.insert_if_absent(session, job, now=utcnow()):
        after_commit(session, signals.job_enqueued)
    queued = repository.get_by_job_id(session, job.job.meta.job_id)
    assert queued is not None, "the row was inserted or already existed"
    return queued


def enqueue_many(
    session: Session, jobs: Sequence[QueueJob], *, signals: QueueSignals
) -> list[EnqueuedJob]:
    """``enqueue`` for a batch, in one statement: the user API hands over its outbox
    this way when many jobs were submitted at once."""
    if repository.insert_many_if_absent(session, jobs, now=utcnow()):
        after_commit(session, signals.job_enqueued)
    rows = repository.summaries_by_job_id(session, [job.job.meta.job_id for job in jobs])
    return [EnqueuedJob(id=id_, job_id=job_id, status=status) for id_, job_id, status in rows]


def lease_jobs(
    session: Session, offer: WorkerOffer, *, policy: QueuePolicy, limit: int, older_than: float
) -> list[LeasedJob]:
    """Lease up to ``limit`` jobs matching ``offer`` to that worker."""
    now = utcnow()
    rows = lease(
        session,
        offer,
        limit=limit,
        older_than=older_than,
        retry_different=policy.retry_different,
        now=now,
        lease_until=now + timedelta(seconds=policy.lease_seconds),
    )
    return [LeasedJob(row.id, JobSpecs.model_validate(row.spec)) for row in rows]


def check_database(session: Session) -> None:
    """Raise ``DatabaseUnavailable`` unless the queue database answers."""
    try:
        repository.ping(session)
    except SQLAlchemyError as exc:
        raise DatabaseUnavailable(
            f"the queue database does not answer: {type(exc).__name__}"
        ) from exc


def status_of(session: Session, queue_id: int) -> JobStatus:
    job = repository.get(session, queue_id)
    if job is None:
        raise JobNotFound(f"job {queue_id} not found")
    return job.status


def report_status(
    session: Session,
    queue_id: int,
    *,
    policy: QueuePolicy,
    worker: str,
    status: JobStatus,
    runtime_details: str | None,
    outcome: Outcome | None = None,
) -> None:
    """Apply a worker's status report, which doubles as its keep-alive.

    The same status again renews the lease; a legal transition is applied and told
    to the user API, with ``outcome`` when the status ends the job; ``queued``
    hands the job back. A worker that does not hold the job (any more), or whose
    job was cancelled, gets ``JobNotFound`` and should abandon the job; any other
    illegal move is ``InvalidTransition``."""
    # Two guarded statements decide; when neither applies, the row as it is then
    # says why. On PostgreSQL another request may change the job between those
    # statements, which shows as a legal move whose guard failed: try again.
    for _ in range(_REPORT_ATTEMPTS):
        now = utcnow()
        lease_until = now + timedelta(seconds=policy.lease_seconds)
        if repository.renew(
            session,
            queue_id,
            worker=worker,
            status=status,
            runtime_details=runtime_details,
            now=now,
            lease_until=lease_until,
        ):
            return
        if transition(
            session,
            queue_id,
            status,
            outcome,
            cause=Cause.REPORT,
            now=now,
            worker=worker,
            lease_until=lease_until,
            runtime_details=runtime_details,
        ):
            return
        job = repository.get(session, queue_id)
        if job is None or job.worker != worker or job.status is JobStatus.CANCELED:
            raise JobNotFound(f"job {queue_id} not found or not held by worker {worker}")
        if job.status is status:
            return  # a repeated final report: already applied
        if status not in ALLOWED_TRANSITIONS[job.status]:
            raise InvalidTransition(f"job {queue_id} cannot go from {job.status} to {status}")
    raise InvalidTransition(f"job {queue_id} keeps changing concurrently; report again")


def cancel(
    session: Session, job_id: int, *, policy: QueuePolicy, discard_outputs: bool = False
) -> bool:
    """Cancel the job with user API id ``job_id`` if it is active; its worker's next
    report gets ``JobNotFound``. True when something was cancelled.

    Unless ``discard_outputs`` (the job is being deleted), the worker that held the
    job may upload its log for ``cancel_log_grace_seconds``: the partial log of a
    stopped run is what a user wants to see after cancelling. A deletion closes
    the window that an earlier cancellation opened."""
    now = utcnow()
    window = None
    if not discard_outputs and policy.cancel_log_grace_seconds > 0:
        window = now + timedelta(seconds=policy.cancel_log_grace_seconds)
    cancelled = transition(
        session,
        ByJobId(job_id),
        JobStatus.CANCELED,
        cause=Cause.CANCEL,
        now=now,
        log_upload_until=window,
    )
    if not cancelled and window is None:
        repository.close_log_window(session, job_id)
    return bool(cancelled)


class Wakeup:
    """Wakes coroutines of one event loop from any thread.

    A waiter takes ``current`` *before* looking for work and then waits on it, so a
    notification that arrives in between is not missed: the event it holds is
    already set."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()

    @property
    def current(self) -> asyncio.Event:
        return self._event

    def notify(self) -> None:
        # A closed loop means the service is shutting down: nobody waits any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        fired, self._event = self._event, asyncio.Event()
        fired.set()

    async def wait(self, event: asyncio.Event, seconds: float) -> bool:
        """Wait until ``event`` fires, at most ``seconds``; True when it fired."""
        with anyio.move_on_after(seconds):
            await event.wait()
            return True
        return False


class JobPuller:
    """Pulls with an optional server-side wait (long-poll).

    Each attempt is its own short transaction run in a worker thread, so the event
    loop never blocks on the database and no connection is held while waiting.
    Waiters wake as soon as this process enqueues a job, and re-check every
    ``recheck_seconds`` for jobs enqueued through another process."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        policy: QueuePolicy,
        wakeup: Wakeup,
        *,
        recheck_seconds: float = 1.0,
    ) -> None:
        self._factory = factory
        self._policy = policy
        self._wakeup = wakeup
        self._recheck_seconds = recheck_seconds

    async def pull(
        self,
        offer: WorkerOffer,
        *,
        limit: int,
        older_than: float,
        wait: float,
        caller_gone: Callable[[], Awaitable[bool]] | None = None,
    ) -> list[LeasedJob]:
        """Lease up to ``limit`` jobs, waiting at most ``wait`` seconds for the first.

        ``caller_gone`` is asked before each new attempt after a wait: a job leased
        to a caller that hung up would sit unseen until its lease expired."""
        deadline = time.monotonic() + wait
        while True:
            signal = self._wakeup.current
            leased = await anyio.to_thread.run_sync(self._lease_once, offer, limit, older_than)
            remaining = deadline - time.monotonic()
            if leased or remaining <= 0:
                return leased
            await self._wakeup.wait(signal, min(remaining, self._recheck_seconds))
            if caller_gone is not None and await caller_gone():
                return []

    def _lease_once(self, offer: WorkerOffer, limit: int, older_than: float) -> list[LeasedJob]:
        with unit_of_work(self._factory) as session:
            return lease_jobs(
                session, offer, policy=self._policy, limit=limit, older_than=older_than
            )
