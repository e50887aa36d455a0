"""The queue's rules: what a pull leases, which status reports are accepted, when a
silent worker's job is re-queued or failed. No HTTP here; errors are domain errors.

Every status change that the user API must hear about is written to the outbox in
the same transaction as the change itself (``worker_api.clients.user_api`` delivers
it), so a change is never lost and never told before it is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import anyio
from sqlalchemy import event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from labcloud.contract import ALLOWED_TRANSITIONS, JobSpecs, JobStatus, QueueJob
from labcloud.db import unit_of_work, utcnow
from labcloud.errors import Conflict, NotFound, Unavailable
from labcloud.storage import Storage, check_key
from worker_api.models import QueuedJob
from worker_api.queue.repository import QueueRepository, Reaped, StatusChange, TakenBack
from worker_api.queue.schemas import EnqueuedJob, WorkerOffer

logger = logging.getLogger(__name__)

_REPORT_ATTEMPTS = 3


class JobNotFound(NotFound):
    """No such job, or this worker does not hold it (any more)."""


class InvalidTransition(Conflict):
    """This status change is not allowed from the job's current status."""


class DatabaseUnavailable(Unavailable):
    """The queue database does not answer."""


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    """Lease length and retry rules (settings ``TIMEOUT_FAILURE``, ``MAX_RETRIES``,
    ``RETRY_DIFFERENT``), and how long the last worker of a job cancelled with its
    outputs kept may upload the job's log (``CANCEL_LOG_GRACE_SECONDS``)."""

    lease_seconds: float = 300.0
    max_retries: int = 2
    retry_different: bool = False
    cancel_log_grace_seconds: float = 120.0


def _nothing() -> None:
    return None


@dataclass(frozen=True, slots=True)
class QueueSignals:
    """Called after the transaction that caused them commits, from whatever thread
    committed it: a job was enqueued (wake long-polling pulls) or a status change
    was written to the outbox (wake the forwarder)."""

    job_enqueued: Callable[[], None] = _nothing
    status_recorded: Callable[[], None] = _nothing


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


def _after_commit(session: Session, callback: Callable[[], None]) -> None:
    def fire(_session: Session) -> None:
        callback()

    event.listen(session, "after_commit", fire, once=True)


@dataclass(frozen=True, slots=True)
class LeasedJob:
    """A job just leased to a worker: its queue id and what the worker runs."""

    queue_id: int
    spec: JobSpecs


class QueueService:
    """Queue operations inside the caller's transaction (the caller commits)."""

    def __init__(
        self, session: Session, policy: QueuePolicy, signals: QueueSignals | None = None
    ) -> None:
        self._session = session
        self._repository = QueueRepository(session)
        self._policy = policy
        self._signals = signals or QueueSignals()

    def enqueue(self, job: QueueJob) -> QueuedJob:
        """Add ``job`` to the queue, or return the existing row when a job with the
        same user API id is already there (the user API retries until it hears back)."""
        if self._repository.insert_if_absent(job, now=utcnow()):
            _after_commit(self._session, self._signals.job_enqueued)
        queued = self._repository.get_by_job_id(job.job.meta.job_id)
        assert queued is not None, "the row was inserted or already existed"
        return queued

    def enqueue_many(self, jobs: Sequence[QueueJob]) -> list[EnqueuedJob]:
        """``enqueue`` for a batch, in one statement: the user API hands over its
        outbox this way when many jobs were submitted at once."""
        if self._repository.insert_many_if_absent(jobs, now=utcnow()):
            _after_commit(self._session, self._signals.job_enqueued)
        rows = self._repository.summaries_by_job_id([job.job.meta.job_id for job in jobs])
        return [EnqueuedJob(id=id_, job_id=job_id, status=status) for id_, job_id, status in rows]

    def lease(self, offer: WorkerOffer, *, limit: int, older_than: float) -> list[LeasedJob]:
        """Lease up to ``limit`` jobs matching ``offer`` to that worker."""
        now = utcnow()
        rows = self._repository.lease(
            offer,
            limit=limit,
            older_than=older_than,
            retry_different=self._policy.retry_different,
            now=now,
            lease_until=now + timedelta(seconds=self._policy.lease_seconds),
        )
        for row in rows:
            self._record(StatusChange(row.job_id, row.status, row.runtime_details))
        return [LeasedJob(row.id, JobSpecs.model_validate(row.spec)) for row in rows]

    def check_database(self) -> None:
        """Raise ``DatabaseUnavailable`` unless the queue database answers."""
        try:
            self._repository.ping()
        except SQLAlchemyError as exc:
            raise DatabaseUnavailable(
                f"the queue database does not answer: {type(exc).__name__}"
            ) from exc

    def status_of(self, queue_id: int) -> JobStatus:
        job = self._repository.get(queue_id)
        if job is None:
            raise JobNotFound(f"job {queue_id} not found")
        return job.status

    def report_status(
        self, queue_id: int, *, worker: str, status: JobStatus, runtime_details: str | None
    ) -> None:
        """Apply a worker's status report, which doubles as its keep-alive.

        The same status again renews the lease; a legal transition is applied and
        told to the user API; ``queued`` hands the job back. A worker that does not
        hold the job (any more), or whose job was cancelled, gets ``JobNotFound``
        and should abandon the job; any other illegal move is ``InvalidTransition``.
        """
        # Two guarded statements decide; when neither applies, the row as it is then
        # says why. On PostgreSQL another request may change the job between those
        # statements, which shows as a legal move whose guard failed: try again.
        for _ in range(_REPORT_ATTEMPTS):
            now = utcnow()
            lease_until = now + timedelta(seconds=self._policy.lease_seconds)
            if self._repository.renew(
                queue_id,
                worker=worker,
                status=status,
                runtime_details=runtime_details,
                now=now,
                lease_until=lease_until,
            ):
                return
            change = self._repository.transition(
                queue_id,
                worker=worker,
                target=status,
                runtime_details=runtime_details,
                now=now,
                lease_until=lease_until,
            )
            if change is not None:
                self._record(change)
                return
            job = self._repository.get(queue_id)
            if job is None or job.worker != worker or job.status is JobStatus.CANCELED:
                raise JobNotFound(f"job {queue_id} not found or not held by worker {worker}")
            if job.status is status:
                return  # a repeated final report: already applied
            if status not in ALLOWED_TRANSITIONS[job.status]:
                raise InvalidTransition(f"job {queue_id} cannot go from {job.status} to {status}")
        raise InvalidTransition(f"job {queue_id} keeps changing concurrently; report again")

    def cancel(self, job_id: int, *, discard_outputs: bool = False) -> bool:
        """Cancel the job with user API id ``job_id`` if it is active; its worker's
        next report gets ``JobNotFound``. True when something was cancelled.

        Unless ``discard_outputs`` (the job is being deleted), the worker that held
        the job may upload its log for ``cancel_log_grace_seconds``: the partial
        log of a stopped run is what a user wants to see after cancelling."""
        now = utcnow()
        window = None
        if not discard_outputs and self._policy.cancel_log_grace_seconds > 0:
            window = now + timedelta(seconds=self._policy.cancel_log_grace_seconds)
        return self._repository.cancel(job_id, now=now, log_upload_until=window)

    def grant_full_leases(self) -> int:
        """Give every leased job at least ``lease_seconds`` from now; run once when
        the service starts, since no keep-alive could arrive while it was down. A
        worker that really went silent is taken back one lease later."""
        return self._repository.extend_leases(
            until=utcnow() + timedelta(seconds=self._policy.lease_seconds)
        )

    def take_back_expired(self) -> Reaped:
        """Take every job whose lease expired away from its silent worker: fail it
        (recorded here), or hold it for ``requeue_taken_back`` once the caller has
        deleted its failed attempt's partial results (``reap_once`` does both)."""
        now = utcnow()
        reaped = self._repository.reap(
            now=now,
            max_retries=self._policy.max_retries,
            timeout=self._policy.lease_seconds,
            # Long enough for any deletion; if this process dies meanwhile, another
            # pass takes the job back again after that.
            cleanup_until=now + timedelta(seconds=self._policy.lease_seconds),
        )
        for change in reaped.failed:
            self._record(change)
        return reaped

    def requeue_taken_back(self, job: TakenBack) -> StatusChange | None:
        """Re-queue a job ``take_back_expired`` returned, whose partial results are
        gone; None when it was cancelled (or taken back again) meanwhile."""
        change = self._repository.requeue_taken_back(
            job.queue_id, claimed_until=job.claimed_until, now=utcnow()
        )
        if change is not None:
            self._record(change)
            _after_commit(self._session, self._signals.job_enqueued)
        return change

    def _record(self, change: StatusChange) -> None:
        self._repository.add_to_outbox(change, now=utcnow())
        _after_commit(self._session, self._signals.status_recorded)


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
        signals: QueueSignals,
        wakeup: Wakeup,
        *,
        recheck_seconds: float = 1.0,
    ) -> None:
        self._factory = factory
        self._policy = policy
        self._signals = signals
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
            return QueueService(session, self._policy, self._signals).lease(
                offer, limit=limit, older_than=older_than
            )


def reap_once(
    factory: sessionmaker[Session], policy: QueuePolicy, signals: QueueSignals, storage: Storage
) -> int:
    """One reaper pass; the number of jobs failed or re-queued.

    The order matters. The jobs are first taken from their silent workers and
    committed (those workers can no longer report or get upload URLs); then, outside
    any transaction (a deletion may take long, and on SQLite a transaction holds
    the write lock), the folders the failed attempt uploaded into are emptied; only
    then is each job re-queued, so no new attempt can have uploaded anything that
    the deletion removes. A deletion that fails leaves its job held: a later pass
    takes it back again and retries."""
    with unit_of_work(factory) as session:
        reaped = QueueService(session, policy, signals).take_back_expired()
    requeued = 0
    for job in reaped.taken_back:
        try:
            delete_partial_results(storage, job)
        except Exception:
            logger.exception(
                "could not delete the partial results of job %s; retrying after %s",
                job.job_id,
                job.claimed_until.isoformat(),
            )
            continue
        with unit_of_work(factory) as session:
            if QueueService(session, policy, signals).requeue_taken_back(job) is not None:
                requeued += 1
    return len(reaped.failed) + requeued


def delete_partial_results(storage: Storage, job: TakenBack) -> None:
    """Remove what the failed attempt of ``job`` uploaded: its result folders
    (``paths_upload``: output, log, artifact), so the next attempt starts from
    nothing and a reader never sees a mix of both attempts."""
    for folder in sorted(set(job.paths_upload.values())):
        storage.delete(check_key(folder))


def grant_full_leases_once(factory: sessionmaker[Session], policy: QueuePolicy) -> int:
    """``QueueService.grant_full_leases`` in its own transaction."""
    with unit_of_work(factory) as session:
        return QueueService(session, policy).grant_full_leases()


async def run_reaper(
    factory: sessionmaker[Session],
    policy: QueuePolicy,
    signals: QueueSignals,
    storage: Storage,
    *,
    interval_seconds: float,
) -> None:
    """Reap expired leases every ``interval_seconds`` until cancelled, after giving
    the leases that ran out while this service was down a full lease again. Safe
    with several processes: each pass is one guarded UPDATE."""
    try:
        extended = await anyio.to_thread.run_sync(grant_full_leases_once, factory, policy)
        if extended:
            logger.info("extended %d lease(s) that ran out while the service was down", extended)
    except Exception:
        logger.exception("could not extend the leases at start; reaping them as they are")
    while True:
        try:
            reaped = await anyio.to_thread.run_sync(reap_once, factory, policy, signals, storage)
            if reaped:
                logger.info("took back %d job(s) whose worker went silent", reaped)
        except Exception:
            # A database hiccup must not end the reaper; the next pass retries.
            logger.exception("reaper pass failed")
        await anyio.sleep(interval_seconds)
