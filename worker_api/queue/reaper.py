"""The reaper: jobs whose worker went silent (no keep-alive within the lease) are
taken back and re-queued, or given up with the outcome ``lost``.

A silent worker's job moves only as the transition table allows: back to
``queued`` from ``pulled``, ``preprocessing`` or ``running`` (the contract's
re-queue), or to ``error``; never to another earlier status. From
``postprocessing`` (results partly uploaded) it ends ``error``, attempts left or
not. Both moves are ``worker_api.queue.lifecycle.transition``'s.

The order of a pass matters. The jobs are first taken from their silent workers
and committed (those workers can no longer report or get upload URLs); then,
outside any transaction (a deletion may take long, and on SQLite a transaction
holds the write lock), the folders the failed attempt uploaded into are emptied;
only then is each job re-queued, so no new attempt can have uploaded anything that
the deletion removes. A deletion that fails leaves its job held: a later pass
takes it back again and retries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import anyio
from sqlalchemy.orm import Session, sessionmaker

from labcloud.contract import FailureKind, JobStatus, Outcome, allowed_sources
from labcloud.db import unit_of_work, utcnow
from labcloud.storage import Storage, check_key
from worker_api.queue import repository
from worker_api.queue.lifecycle import Cause, transition
from worker_api.queue.policy import QueuePolicy, QueueSignals, after_commit
from worker_api.queue.repository import ExpiredLease

logger = logging.getLogger(__name__)

# Where a silent worker's job may go back to the queue: the statuses from which
# the state machine allows ``queued``. From the others it ends ``error``.
_REQUEUE_SOURCES = allowed_sources(JobStatus.QUEUED)


@dataclass(frozen=True, slots=True)
class TakenBack:
    """A job taken from its silent worker: held until ``claimed_until`` while the
    partial results of the failed attempt (the folders of ``paths_upload``) are
    deleted, then re-queued."""

    queue_id: int
    job_id: int
    paths_upload: dict[str, str]
    claimed_until: datetime


@dataclass(slots=True)
class Reaped:
    """What one ``take_back_expired`` did: user API ids of the jobs given up
    (``error``, ``lost``), jobs taken back."""

    lost: list[int] = field(default_factory=list)
    taken_back: list[TakenBack] = field(default_factory=list)


def take_back_expired(session: Session, policy: QueuePolicy) -> Reaped:
    """Take every job whose lease expired away from its silent worker.

    A job that may go back to ``queued`` and has had at most ``max_retries``
    attempts is *taken back*: its status stays, its worker is cleared and it is
    held until a lease from now, while the caller deletes the failed attempt's
    partial results and then calls ``requeue_taken_back``. Any other job ends
    ``error`` with the reason and the outcome ``lost``.

    A job taken back earlier whose re-queue never came (the process died while
    deleting) is taken back again once its hold passed; the decision and the
    reason written then stand. The silent worker is remembered in
    ``failed_workers``."""
    now = utcnow()
    # Long enough for any deletion; if this process dies meanwhile, another pass
    # takes the job back again after that.
    hold_until = now + timedelta(seconds=policy.lease_seconds)
    reaped = Reaped()
    for expired in repository.claim_expired_leases(session, now=now):
        if expired.worker is None:
            reason = expired.runtime_details  # taken back earlier: that decision stands
        elif expired.status not in _REQUEUE_SOURCES or expired.attempts > policy.max_retries:
            if _give_up(session, expired, policy, now=now):
                reaped.lost.append(expired.job_id)
            continue
        else:
            reason = (
                f"{_silence(expired, policy)}; re-queued for attempt {expired.attempts + 1} "
                f"of {policy.max_retries + 1}"
            )
        if repository.hold_for_cleanup(session, expired, reason=reason, until=hold_until, now=now):
            reaped.taken_back.append(
                TakenBack(expired.queue_id, expired.job_id, expired.paths_upload, hold_until)
            )
    return reaped


def _silence(expired: ExpiredLease, policy: QueuePolicy) -> str:
    return (
        f"worker {expired.worker} sent no keep-alive for {policy.lease_seconds:g} s "
        f"(attempt {expired.attempts} of {policy.max_retries + 1}, {expired.status.value})"
    )


def _give_up(
    session: Session, expired: ExpiredLease, policy: QueuePolicy, *, now: datetime
) -> bool:
    if expired.status in _REQUEUE_SOURCES:
        reason = f"{_silence(expired, policy)}; giving up"
    else:
        reason = (
            f"{_silence(expired, policy)}; giving up: it had started uploading its "
            "results, so it is not run again"
        )
    moved = transition(
        session,
        expired.queue_id,
        JobStatus.ERROR,
        Outcome(failure=FailureKind.LOST, ended_at=now),
        cause=Cause.LOST,
        now=now,
        worker=expired.worker,
        runtime_details=reason,
    )
    return bool(moved)


def requeue_taken_back(session: Session, job: TakenBack, *, signals: QueueSignals) -> bool:
    """Put a job ``take_back_expired`` returned into the queue, its partial results
    gone, if it is still held by that very pass: not cancelled meanwhile, and not
    taken back again by another process whose cleanup then runs."""
    moved = transition(
        session,
        job.queue_id,
        JobStatus.QUEUED,
        cause=Cause.REQUEUE,
        now=utcnow(),
        claimed_until=job.claimed_until,
    )
    if moved:
        after_commit(session, signals.job_enqueued)
    return bool(moved)


def reap_once(
    factory: sessionmaker[Session], policy: QueuePolicy, signals: QueueSignals, storage: Storage
) -> int:
    """One reaper pass (see the module docstring); the number of jobs given up or
    re-queued."""
    with unit_of_work(factory) as session:
        reaped = take_back_expired(session, policy)
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
            if requeue_taken_back(session, job, signals=signals):
                requeued += 1
    return len(reaped.lost) + requeued


def delete_partial_results(storage: Storage, job: TakenBack) -> None:
    """Remove what the failed attempt of ``job`` uploaded: its result folders
    (``paths_upload``: output, log, artifact), so the next attempt starts from
    nothing and a reader never sees a mix of both attempts."""
    for folder in sorted(set(job.paths_upload.values())):
        storage.delete(check_key(folder))


def grant_full_leases_once(factory: sessionmaker[Session], policy: QueuePolicy) -> int:
    """Give every leased job at least ``lease_seconds`` from now, in its own
    transaction; run once when the service starts, since no keep-alive could arrive
    while it was down. A worker that really went silent is taken back one lease
    later."""
    with unit_of_work(factory) as session:
        return repository.extend_leases(
            session, until=utcnow() + timedelta(seconds=policy.lease_seconds)
        )


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
    with several processes: each pass takes only rows no other pass holds."""
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
