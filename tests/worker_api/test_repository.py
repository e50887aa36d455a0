"""The queue's SQL on SQLite and PostgreSQL: matching, ordering, leasing under
concurrency (``worker_api.queue.lease``), guarded transitions
(``worker_api.queue.lifecycle``), cancellation, reaping (``worker_api.queue.reaper``)."""

from __future__ import annotations

import random
import threading
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, event, func, insert, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from labcloud.contract import (
    ALLOWED_TRANSITIONS,
    LEASED_STATUSES,
    Environment,
    HardwareSpec,
    JobStatus,
)
from labcloud.db import unit_of_work, utcnow
from tests.worker_api.conftest import queue_job
from worker_api.models import QueuedJob
from worker_api.queue import reaper, repository, service
from worker_api.queue.lease import lease as lease_jobs
from worker_api.queue.lifecycle import ByJobId, Cause, transition
from worker_api.queue.policy import QueuePolicy, QueueSignals
from worker_api.queue.reaper import Reaped, TakenBack
from worker_api.queue.repository import gpus_needed
from worker_api.queue.schemas import WorkerOffer

WORKER = WorkerOffer(name="w1", environment=Environment.LOCAL, memory=8000, cpu_cores=4)
# A status change as the user API hears of it: job id, status, details.
Change = tuple[int, JobStatus, str | None]


def changes(moved: list[QueuedJob]) -> list[Change]:
    return [(job.job_id, job.status, job.runtime_details) for job in moved]


def enqueue(factory: sessionmaker[Session], *jobs: int, **options: object) -> None:
    with unit_of_work(factory) as session:
        for job_id in jobs:
            repository.insert_if_absent(session, queue_job(job_id, **options), now=utcnow())  # type: ignore[arg-type]


def lease(
    factory: sessionmaker[Session],
    offer: WorkerOffer = WORKER,
    *,
    limit: int = 10,
    older_than: float = 0,
    retry_different: bool = False,
    lease_seconds: float = 60,
) -> list[int]:
    """The user API ids of the jobs leased."""
    now = utcnow()
    with unit_of_work(factory) as session:
        rows = lease_jobs(
            session,
            offer,
            limit=limit,
            older_than=older_than,
            retry_different=retry_different,
            now=now,
            lease_until=now + timedelta(seconds=lease_seconds),
        )
        return [row.job_id for row in rows]


def row(factory: sessionmaker[Session], job_id: int) -> QueuedJob:
    with unit_of_work(factory) as session:
        job = repository.get_by_job_id(session, job_id)
        assert job is not None
        return job


def test_insert_is_idempotent_and_copies_hardware(factory: sessionmaker[Session]) -> None:
    hardware = HardwareSpec(cpu_cores=2, memory=1000, gpu_mem=500, gpu_model="A100", gpu_archi="x")
    with unit_of_work(factory) as session:
        assert repository.insert_if_absent(session, queue_job(7, hardware=hardware), now=utcnow())
        assert not repository.insert_if_absent(session, queue_job(7, priority=5), now=utcnow())
    with unit_of_work(factory) as session:
        assert session.scalar(select(func.count()).select_from(QueuedJob)) == 1
    job = row(factory, 7)
    assert (job.cpu_cores, job.memory, job.gpu_mem, job.gpu_model, job.gpu_archi) == (
        2,
        1000,
        500,
        "A100",
        "x",
    )
    assert job.priority == 0
    assert job.status is JobStatus.QUEUED
    assert job.failed_workers == []
    assert job.spec["meta"]["job_id"] == 7


def test_insert_many_skips_jobs_already_queued(factory: sessionmaker[Session]) -> None:
    with unit_of_work(factory) as session:
        assert repository.insert_many_if_absent(session, [queue_job(2)], now=utcnow()) == 1
        jobs = [queue_job(job_id, priority=3) for job_id in (1, 2, 3)]
        assert repository.insert_many_if_absent(session, jobs, now=utcnow()) == 2
        assert repository.insert_many_if_absent(session, [], now=utcnow()) == 0
        summaries = repository.summaries_by_job_id(session, [1, 2, 3, 4])
    assert [(job_id, status) for _id, job_id, status in summaries] == [
        (2, JobStatus.QUEUED),
        (1, JobStatus.QUEUED),
        (3, JobStatus.QUEUED),
    ]
    assert (row(factory, 1).priority, row(factory, 2).priority) == (3, 0)


def test_environment_must_match(factory: sessionmaker[Session]) -> None:
    enqueue(factory, 1, environment=Environment.CLOUD)
    assert lease(factory) == []
    cloud = WorkerOffer(name="c1", environment=Environment.CLOUD, memory=8000)
    assert lease(factory, cloud) == [1]


def test_any_environment_job_waits_for_older_than(factory: sessionmaker[Session]) -> None:
    enqueue(factory, 1, environment=None)
    assert lease(factory, older_than=60) == []
    with unit_of_work(factory) as session:
        session.execute(update(QueuedJob).values(created_at=utcnow() - timedelta(seconds=120)))
    assert lease(factory, older_than=60) == [1]


def test_any_environment_job_goes_to_any_worker_without_older_than(
    factory: sessionmaker[Session],
) -> None:
    enqueue(factory, 1, environment=None)
    cloud = WorkerOffer(name="c1", environment=Environment.CLOUD, memory=8000)
    assert lease(factory, cloud) == [1]


@pytest.mark.parametrize(
    ("needs", "offer", "matches"),
    [
        (HardwareSpec(cpu_cores=8), {"cpu_cores": 4}, False),
        (HardwareSpec(cpu_cores=4), {"cpu_cores": 4}, True),
        (HardwareSpec(memory=9000), {"memory": 8000}, False),
        (HardwareSpec(memory=8000), {"memory": 8000}, True),
        # Any GPU property makes a job need a GPU: never leased without a free one,
        # whatever GPU memory, model or architecture the worker reports.
        (HardwareSpec(gpu_mem=1), {"gpu_mem": 0}, False),
        (HardwareSpec(gpu_mem=1), {"gpu_mem": 8192, "gpus": 0}, False),
        (HardwareSpec(gpu_mem=4096), {"gpu_mem": 8192, "gpus": 1}, True),
        (HardwareSpec(gpu_mem=9000), {"gpu_mem": 8192, "gpus": 1}, False),
        (HardwareSpec(gpu_model="A100"), {}, False),
        (HardwareSpec(gpu_model="A100"), {"gpu_model": "A100", "gpus": 0}, False),
        (HardwareSpec(gpu_model="A100"), {"gpu_model": "V100", "gpus": 1}, False),
        (HardwareSpec(gpu_model="A100"), {"gpu_model": "A100", "gpus": 1}, True),
        (HardwareSpec(gpu_archi="8.0"), {"gpu_archi": "7.5", "gpus": 1}, False),
        (HardwareSpec(gpu_archi="8.0"), {"gpu_archi": "8.0", "gpus": 1}, True),
        (HardwareSpec(gpu_archi="8.0"), {"gpu_model": "A100", "gpus": 1}, False),
        # The GPU count itself.
        (HardwareSpec(gpus=1), {}, False),
        (HardwareSpec(gpus=1), {"gpus": 1}, True),
        (HardwareSpec(gpus=2), {"gpus": 1, "gpu_mem": 8192}, False),
        (HardwareSpec(gpus=2, gpu_mem=4096), {"gpus": 2, "gpu_mem": 8192}, True),
        (HardwareSpec(gpus=0), {}, True),
        # A job without GPU needs runs on GPU workers too.
        (HardwareSpec(), {"gpu_model": "A100", "gpu_archi": "8.0", "gpu_mem": 8, "gpus": 4}, True),
        (
            HardwareSpec(cpu_cores=4, memory=8000, gpus=1, gpu_mem=8192, gpu_model="A100"),
            {"cpu_cores": 4, "memory": 8000, "gpus": 1, "gpu_mem": 8192, "gpu_model": "A100"},
            True,
        ),
    ],
)
def test_hardware_matching(
    factory: sessionmaker[Session], needs: HardwareSpec, offer: dict[str, Any], matches: bool
) -> None:
    enqueue(factory, 1, hardware=needs)
    worker = WorkerOffer(
        name="w1",
        environment=Environment.LOCAL,
        memory=int(offer.get("memory", 8000)),
        cpu_cores=int(offer.get("cpu_cores", 4)),
        gpu_mem=int(offer.get("gpu_mem", 0)),
        gpu_model=offer.get("gpu_model"),
        gpu_archi=offer.get("gpu_archi"),
        gpus=int(offer.get("gpus", 0)),
    )
    assert lease(factory, worker) == ([1] if matches else [])


@pytest.mark.parametrize(
    ("hardware", "gpus"),
    [
        (HardwareSpec(), 0),
        (HardwareSpec(gpus=0), 0),
        (HardwareSpec(gpu_mem=0), 0),
        (HardwareSpec(gpu_mem=1), 1),
        (HardwareSpec(gpu_model="A10"), 1),
        (HardwareSpec(gpu_archi="8.6"), 1),
        (HardwareSpec(gpus=0, gpu_model="A10"), 1),
        (HardwareSpec(gpus=3), 3),
        (HardwareSpec(gpus=2, gpu_mem=100), 2),
    ],
)
def test_gpus_needed(hardware: HardwareSpec, gpus: int) -> None:
    assert gpus_needed(hardware) == gpus


def test_a_gpu_job_waits_for_a_gpu_worker_behind_cpu_jobs(
    factory: sessionmaker[Session],
) -> None:
    enqueue(factory, 1, hardware=HardwareSpec(gpus=1), priority=5)
    enqueue(factory, 2, 3)
    # The CPU worker skips the GPU job at the head of the line ...
    assert lease(factory, limit=1) == [2]
    gpu_worker = WorkerOffer(
        name="g1", environment=Environment.LOCAL, memory=8000, gpus=1, gpu_mem=16000
    )
    # ... which goes to the first worker with a free GPU.
    assert lease(factory, gpu_worker, limit=1) == [1]
    assert lease(factory, gpu_worker, limit=1) == [3]


def test_environment_and_anywhere_jobs_share_one_line(factory: sessionmaker[Session]) -> None:
    # Jobs for "anywhere" and for this environment are ordered together: priority,
    # then age, whichever branch of the environment rule they come from.
    enqueue(factory, 1, environment=None)
    enqueue(factory, 2, environment=Environment.LOCAL)
    enqueue(factory, 3, environment=None, priority=2)
    enqueue(factory, 4, environment=Environment.CLOUD, priority=5)
    enqueue(factory, 5, environment=Environment.LOCAL, priority=2)
    assert lease(factory, limit=1) == [3]
    assert lease(factory, limit=10) == [5, 1, 2]
    cloud = WorkerOffer(name="c1", environment=Environment.CLOUD, memory=8000)
    assert lease(factory, cloud) == [4]


def test_older_than_only_holds_back_anywhere_jobs(factory: sessionmaker[Session]) -> None:
    enqueue(factory, 1, environment=None, priority=5)
    enqueue(factory, 2, environment=Environment.LOCAL)
    enqueue(factory, 3, environment=None)
    with unit_of_work(factory) as session:
        session.execute(
            update(QueuedJob)
            .where(QueuedJob.job_id == 3)
            .values(created_at=utcnow() - timedelta(seconds=120))
        )
    # Job 1 is too young for this worker, job 3 old enough (and older than 2).
    assert lease(factory, older_than=60) == [3, 2]
    assert lease(factory, older_than=0) == [1]


def test_priority_first_then_oldest(factory: sessionmaker[Session]) -> None:
    enqueue(factory, 1, 2)
    enqueue(factory, 3, priority=3)
    enqueue(factory, 4, priority=1)
    enqueue(factory, 5, priority=3)
    assert lease(factory, limit=2) == [3, 5]
    assert lease(factory, limit=1) == [4]
    assert lease(factory, limit=10) == [1, 2]
    assert lease(factory) == []


def test_lease_sets_worker_lease_and_attempts(factory: sessionmaker[Session]) -> None:
    enqueue(factory, 1)
    before = utcnow()
    assert lease(factory, lease_seconds=30) == [1]
    job = row(factory, 1)
    assert job.status is JobStatus.PULLED
    assert job.worker == "w1"
    assert job.attempts == 1
    assert job.lease_expires_at is not None
    assert before + timedelta(seconds=29) < job.lease_expires_at < utcnow() + timedelta(seconds=31)


def test_retry_different_skips_workers_that_failed(factory: sessionmaker[Session]) -> None:
    enqueue(factory, 1)
    with unit_of_work(factory) as session:
        session.execute(update(QueuedJob).values(failed_workers=["w1", "w3"]))
    assert lease(factory, retry_different=True) == []
    other = WorkerOffer(name="w2", environment=Environment.LOCAL, memory=8000)
    assert lease(factory, other, retry_different=True) == [1]


def test_without_retry_different_a_failed_worker_may_retry(
    factory: sessionmaker[Session],
) -> None:
    enqueue(factory, 1)
    with unit_of_work(factory) as session:
        session.execute(update(QueuedJob).values(failed_workers=["w1"]))
    assert lease(factory) == [1]


def test_concurrent_pulls_lease_each_job_exactly_once(factory: sessionmaker[Session]) -> None:
    total, pullers = 2000, 8
    # Pullers race, each with its own sessions, taking 1 to 5 jobs a time until the
    # queue is empty: every job is leased once, to one of them, and none is lost.
    with unit_of_work(factory) as session:
        now = utcnow()
        session.execute(
            insert(QueuedJob),
            [
                {
                    "job_id": job_id,
                    "spec": {},
                    "paths_upload": {},
                    "environment": Environment.LOCAL.value if job_id % 3 else None,
                    "priority": job_id % 6,
                    "gpus": 0,
                    "status": JobStatus.QUEUED,
                    "attempts": 0,
                    "failed_workers": [],
                    "created_at": now - timedelta(seconds=job_id % 97),
                    "updated_at": now,
                }
                for job_id in range(1, total + 1)
            ],
        )
    leased: dict[str, list[int]] = {f"w{n}": [] for n in range(pullers)}
    errors: list[BaseException] = []
    start = threading.Barrier(pullers)

    def pull(name: str, seed: int) -> None:
        limits = random.Random(seed)
        offer = WorkerOffer(name=name, environment=Environment.LOCAL, memory=8000)
        try:
            start.wait(timeout=10)
            while batch := lease(factory, offer, limit=limits.randint(1, 5)):
                leased[name].extend(batch)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=pull, args=(name, seed)) for seed, name in enumerate(leased)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=90)
    assert not any(thread.is_alive() for thread in workers)
    assert not errors
    everything = [job for jobs in leased.values() for job in jobs]
    assert len(everything) == total
    assert sorted(everything) == list(range(1, total + 1))
    assert sum(1 for jobs in leased.values() if jobs) > 1, "the pullers did race"
    with unit_of_work(factory) as session:
        for job in session.scalars(select(QueuedJob)):
            assert job.status is JobStatus.PULLED
            assert job.attempts == 1
            assert job.job_id in leased[job.worker or ""]


def _transition(
    factory: sessionmaker[Session], target: JobStatus, *, worker: str = "w1"
) -> list[Change]:
    """A report of ``worker`` moving job 1 to ``target``: what moved."""
    now = utcnow()
    with unit_of_work(factory) as session:
        queue_id = repository.get_by_job_id(session, 1).id  # type: ignore[union-attr]
        moved = transition(
            session,
            queue_id,
            target,
            cause=Cause.REPORT,
            now=now,
            worker=worker,
            lease_until=now + timedelta(seconds=60),
        )
        return changes(moved)


def test_transition_is_guarded_by_assignee_and_table(factory: sessionmaker[Session]) -> None:
    enqueue(factory, 1)
    lease(factory)
    assert _transition(factory, JobStatus.RUNNING, worker="intruder") == []
    assert _transition(factory, JobStatus.RUNNING) == [(1, JobStatus.RUNNING, None)]
    # Backwards, or the same status, is not a transition.
    assert _transition(factory, JobStatus.PREPROCESSING) == []
    assert _transition(factory, JobStatus.RUNNING) == []
    assert _transition(factory, JobStatus.FINISHED) == [(1, JobStatus.FINISHED, None)]
    assert row(factory, 1).lease_expires_at is None
    assert _transition(factory, JobStatus.ERROR) == []
    assert row(factory, 1).status is JobStatus.FINISHED


def test_reports_move_exactly_as_the_transition_table_allows(
    factory: sessionmaker[Session],
) -> None:
    enqueue(factory, 1)
    lease(factory)
    queue_id = row(factory, 1).id
    refused_moves: list[tuple[JobStatus, JobStatus]] = []
    applied: list[tuple[JobStatus, JobStatus]] = []
    for source in JobStatus:
        for target in JobStatus:
            with unit_of_work(factory) as session:
                session.execute(
                    update(QueuedJob).values(
                        status=source,
                        worker="w1",
                        lease_expires_at=utcnow() + timedelta(seconds=60),
                    )
                )
            now = utcnow()
            with unit_of_work(factory) as session:
                moved = transition(
                    session,
                    queue_id,
                    target,
                    cause=Cause.REPORT,
                    now=now,
                    worker="w1",
                    lease_until=now + timedelta(seconds=60),
                )
            (applied if moved else refused_moves).append((source, target))
            assert row(factory, 1).status is (target if moved else source)
    assert set(applied) == {
        (source, target) for source in JobStatus for target in ALLOWED_TRANSITIONS[source]
    }
    assert len(applied) + len(refused_moves) == len(JobStatus) ** 2


@pytest.mark.parametrize(
    ("cause", "target", "arguments"),
    [
        (Cause.LEASE, JobStatus.RUNNING, {"worker": "w1", "lease_until": utcnow()}),
        (Cause.LEASE, JobStatus.PULLED, {"lease_until": utcnow()}),
        (Cause.REPORT, JobStatus.RUNNING, {"worker": "w1"}),
        (Cause.CANCEL, JobStatus.ERROR, {}),
        (Cause.LOST, JobStatus.QUEUED, {"worker": "w1"}),
        (Cause.REQUEUE, JobStatus.PULLED, {"claimed_until": utcnow(), "lease_until": utcnow()}),
        (Cause.REQUEUE, JobStatus.QUEUED, {}),
    ],
)
def test_a_cause_takes_only_its_own_moves(
    factory: sessionmaker[Session], cause: Cause, target: JobStatus, arguments: dict[str, Any]
) -> None:
    with unit_of_work(factory) as session, pytest.raises(ValueError, match=str(cause)):
        transition(session, 1, target, cause=cause, now=utcnow(), **arguments)


def test_hand_back_clears_worker_without_penalty(factory: sessionmaker[Session]) -> None:
    enqueue(factory, 1)
    lease(factory)
    assert _transition(factory, JobStatus.QUEUED) == [(1, JobStatus.QUEUED, None)]
    job = row(factory, 1)
    assert (job.status, job.worker, job.attempts, job.lease_expires_at) == (
        JobStatus.QUEUED,
        None,
        0,
        None,
    )
    assert job.failed_workers == []


def test_renew_extends_only_the_holders_lease_in_that_status(
    factory: sessionmaker[Session],
) -> None:
    enqueue(factory, 1)
    lease(factory, lease_seconds=1)
    queue_id = row(factory, 1).id
    later = utcnow() + timedelta(seconds=300)

    def renew(worker: str, status: JobStatus) -> bool:
        with unit_of_work(factory) as session:
            return repository.renew(
                session,
                queue_id,
                worker=worker,
                status=status,
                runtime_details="still here",
                now=utcnow(),
                lease_until=later,
            )

    assert not renew("intruder", JobStatus.PULLED)
    assert not renew("w1", JobStatus.RUNNING)
    assert renew("w1", JobStatus.PULLED)
    job = row(factory, 1)
    assert job.lease_expires_at == later
    assert job.runtime_details == "still here"


def test_cancel_only_active_jobs(factory: sessionmaker[Session]) -> None:
    enqueue(factory, 1, 2)
    with unit_of_work(factory) as session:
        for job_id, cancelled in ((1, True), (1, False), (99, False)):
            moved = transition(
                session, ByJobId(job_id), JobStatus.CANCELED, cause=Cause.CANCEL, now=utcnow()
            )
            assert bool(moved) is cancelled
    assert row(factory, 1).status is JobStatus.CANCELED
    assert lease(factory) == [2]


def _cancel(factory: sessionmaker[Session], job_id: int, window: timedelta | None) -> bool:
    """The user API cancels (``window``: the log grace) or deletes (None) the job."""
    policy = QueuePolicy(cancel_log_grace_seconds=window.total_seconds() if window else 0)
    with unit_of_work(factory) as session:
        return service.cancel(session, job_id, policy=policy, discard_outputs=window is None)


def _log_upload_allowed(factory: sessionmaker[Session], job_id: int, worker: str = "w1") -> bool:
    queue_id = row(factory, job_id).id
    with unit_of_work(factory) as session:
        allowed = repository.log_upload_allowed(session, queue_id, worker, now=utcnow())
        return allowed is not None


def test_cancel_opens_a_log_window_for_the_last_worker_only(
    factory: sessionmaker[Session],
) -> None:
    enqueue(factory, 1, 2, 3)
    assert lease(factory, limit=2) == [1, 2]
    assert _cancel(factory, 1, timedelta(seconds=60))
    assert _cancel(factory, 3, timedelta(seconds=60))  # queued: nobody to upload
    job = row(factory, 1)
    assert (job.status, job.worker, job.lease_expires_at) == (JobStatus.CANCELED, "w1", None)
    assert job.log_upload_until is not None
    assert _log_upload_allowed(factory, 1)
    assert not _log_upload_allowed(factory, 1, worker="w2")
    assert not _log_upload_allowed(factory, 2)  # held, not cancelled: a normal upload
    assert row(factory, 3).log_upload_until is None
    assert not _log_upload_allowed(factory, 3)


def test_cancel_discarding_outputs_closes_the_window(factory: sessionmaker[Session]) -> None:
    enqueue(factory, 1, 2)
    lease(factory, limit=2)
    assert _cancel(factory, 1, None)
    assert not _log_upload_allowed(factory, 1)
    # A deletion after a cancellation that kept the outputs closes the window too.
    assert _cancel(factory, 2, timedelta(seconds=60))
    assert _log_upload_allowed(factory, 2)
    assert not _cancel(factory, 2, None)
    assert not _log_upload_allowed(factory, 2)
    assert row(factory, 2).status is JobStatus.CANCELED


def test_log_window_ends(factory: sessionmaker[Session]) -> None:
    enqueue(factory, 1)
    lease(factory)
    _cancel(factory, 1, timedelta(seconds=60))
    with unit_of_work(factory) as session:
        session.execute(update(QueuedJob).values(log_upload_until=utcnow() - timedelta(seconds=1)))
    assert not _log_upload_allowed(factory, 1)


def _expire_leases(factory: sessionmaker[Session]) -> None:
    with unit_of_work(factory) as session:
        session.execute(
            update(QueuedJob)
            .where(QueuedJob.lease_expires_at.is_not(None))
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def _take_back(factory: sessionmaker[Session], max_retries: int) -> Reaped:
    with unit_of_work(factory) as session:
        return reaper.take_back_expired(
            session, QueuePolicy(lease_seconds=30, max_retries=max_retries)
        )


def _requeue(factory: sessionmaker[Session], job: TakenBack) -> bool:
    with unit_of_work(factory) as session:
        return reaper.requeue_taken_back(session, job, signals=QueueSignals())


def _change(factory: sessionmaker[Session], job_id: int) -> Change:
    job = row(factory, job_id)
    return (job.job_id, job.status, job.runtime_details)


def _reap(factory: sessionmaker[Session], max_retries: int) -> list[Change]:
    """A reaper pass without results to delete (take back, then re-queue): the
    jobs given up and re-queued, as they are then."""
    reaped = _take_back(factory, max_retries)
    requeued = [job.job_id for job in reaped.taken_back if _requeue(factory, job)]
    return [_change(factory, job_id) for job_id in [*reaped.lost, *requeued]]


def test_reap_requeues_then_fails(factory: sessionmaker[Session]) -> None:
    enqueue(factory, 1, 2)
    lease(factory, limit=1)
    assert _reap(factory, max_retries=1) == []  # the lease has not expired
    _expire_leases(factory)
    assert _reap(factory, max_retries=1) == [
        (
            1,
            JobStatus.QUEUED,
            "worker w1 sent no keep-alive for 30 s (attempt 1 of 2, pulled); "
            "re-queued for attempt 2 of 2",
        )
    ]
    job = row(factory, 1)
    assert (job.status, job.worker, job.lease_expires_at, job.failed_workers) == (
        JobStatus.QUEUED,
        None,
        None,
        ["w1"],
    )
    assert lease(factory, limit=1) == [1]  # the same worker may retry
    _expire_leases(factory)
    [change] = _reap(factory, max_retries=1)
    assert change == (
        1,
        JobStatus.ERROR,
        "worker w1 sent no keep-alive for 30 s (attempt 2 of 2, pulled); giving up",
    )
    job = row(factory, 1)
    assert (job.status, job.worker, job.failed_workers, job.attempts) == (
        JobStatus.ERROR,
        None,
        ["w1"],
        2,
    )
    assert row(factory, 2).status is JobStatus.QUEUED


def _set_status(factory: sessionmaker[Session], job_id: int, status: JobStatus) -> None:
    with unit_of_work(factory) as session:
        session.execute(update(QueuedJob).where(QueuedJob.job_id == job_id).values(status=status))


@pytest.mark.parametrize("status", sorted(LEASED_STATUSES))
def test_reap_moves_only_as_the_transition_table_allows(
    factory: sessionmaker[Session], status: JobStatus
) -> None:
    """A job whose worker went silent goes back to the queue only from where the
    state machine allows it; from ``postprocessing`` (results partly uploaded) it
    ends ``error``, attempts left or not."""
    enqueue(factory, 1)
    lease(factory)
    _set_status(factory, 1, status)
    _expire_leases(factory)
    [change] = _reap(factory, max_retries=5)
    assert change[1] in ALLOWED_TRANSITIONS[status]
    assert row(factory, 1).status is change[1]
    if JobStatus.QUEUED in ALLOWED_TRANSITIONS[status]:
        assert change == (
            1,
            JobStatus.QUEUED,
            f"worker w1 sent no keep-alive for 30 s (attempt 1 of 6, {status.value}); "
            "re-queued for attempt 2 of 6",
        )
    else:
        assert change == (
            1,
            JobStatus.ERROR,
            f"worker w1 sent no keep-alive for 30 s (attempt 1 of 6, {status.value}); "
            "giving up: it had started uploading its results, so it is not run again",
        )


def test_a_job_taken_back_is_nobodys_until_requeued(factory: sessionmaker[Session]) -> None:
    """Between the take-back and the re-queue (the partial results are deleted
    then), the silent worker may no longer report and no worker may lease the job."""
    enqueue(factory, 1)
    lease(factory)
    _set_status(factory, 1, JobStatus.RUNNING)
    _expire_leases(factory)
    reaped = _take_back(factory, max_retries=1)
    assert reaped.lost == []
    [taken] = reaped.taken_back
    assert (taken.job_id, taken.paths_upload) == (
        1,
        {"output": "u1/output/job1", "log": "u1/log/job1", "artifact": "u1/artifact/job1"},
    )
    job = row(factory, 1)
    assert (job.status, job.worker, job.lease_expires_at) == (
        JobStatus.RUNNING,
        None,
        taken.claimed_until,
    )
    assert lease(factory) == []
    now = utcnow()
    with unit_of_work(factory) as session:
        assert not repository.renew(
            session,
            job.id,
            worker="w1",
            status=JobStatus.RUNNING,
            runtime_details=None,
            now=now,
            lease_until=now + timedelta(seconds=60),
        )
        moved = transition(
            session,
            job.id,
            JobStatus.POSTPROCESSING,
            cause=Cause.REPORT,
            now=now,
            worker="w1",
            lease_until=now + timedelta(seconds=60),
        )
        assert moved == []
        assert repository.leased_to(session, job.id, "w1") is None
    assert _take_back(factory, max_retries=1) == Reaped()  # held, not expired
    assert _requeue(factory, taken)
    assert not _requeue(factory, taken)  # once
    assert lease(factory) == [1]


def test_a_cancelled_job_taken_back_is_not_requeued(factory: sessionmaker[Session]) -> None:
    enqueue(factory, 1)
    lease(factory)
    _expire_leases(factory)
    [taken] = _take_back(factory, max_retries=1).taken_back
    with unit_of_work(factory) as session:
        assert service.cancel(session, 1, policy=QueuePolicy(), discard_outputs=True)
    assert not _requeue(factory, taken)
    assert row(factory, 1).status is JobStatus.CANCELED


def test_a_take_back_whose_cleanup_never_ended_is_redone(factory: sessionmaker[Session]) -> None:
    """The process died while deleting: once the hold ends the job is taken back
    again, with the decision and reason of the first time, and only the latest
    take-back may re-queue it (the first one's deletion may still be running)."""
    enqueue(factory, 1)
    lease(factory)
    _expire_leases(factory)
    [first] = _take_back(factory, max_retries=1).taken_back
    _expire_leases(factory)
    with unit_of_work(factory) as session:  # a start-up extends no worker's lease here
        assert repository.extend_leases(session, until=utcnow() + timedelta(seconds=60)) == 0
    # Even with MAX_RETRIES lowered meanwhile, the first decision stands.
    [second] = _take_back(factory, max_retries=0).taken_back
    assert second.claimed_until != first.claimed_until
    assert not _requeue(factory, first)
    assert _requeue(factory, second)
    assert _change(factory, 1) == (
        1,
        JobStatus.QUEUED,
        "worker w1 sent no keep-alive for 30 s (attempt 1 of 2, pulled); "
        "re-queued for attempt 2 of 2",
    )
    assert row(factory, 1).failed_workers == ["w1"]


def test_reap_remembers_each_silent_worker(factory: sessionmaker[Session]) -> None:
    enqueue(factory, 1)
    for name in ("w1", "w2"):
        lease(factory, WorkerOffer(name=name, environment=Environment.LOCAL, memory=8000))
        _expire_leases(factory)
        _reap(factory, max_retries=5)
    assert row(factory, 1).failed_workers == ["w1", "w2"]


def test_concurrent_reapers_take_each_job_back_once(factory: sessionmaker[Session]) -> None:
    total, reapers = 300, 4
    enqueue(factory, *range(1, total + 1))
    lease(factory, limit=total)
    _expire_leases(factory)
    requeued: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(reapers)

    def reap() -> None:
        try:
            start.wait(timeout=10)
            reaped = _take_back(factory, max_retries=5)
            assert reaped.lost == []
            requeued.extend(job.job_id for job in reaped.taken_back if _requeue(factory, job))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reap) for _ in range(reapers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert sorted(requeued) == list(range(1, total + 1))
    with unit_of_work(factory) as session:
        statuses = session.scalars(select(QueuedJob.status).distinct()).all()
    assert statuses == [JobStatus.QUEUED]


@pytest.mark.postgres
def test_reaper_skips_a_lease_being_renewed(
    postgres_factory: sessionmaker[Session],
) -> None:
    factory = postgres_factory
    enqueue(factory, 1, 2)
    lease(factory, limit=2)
    _expire_leases(factory)
    queue_id = row(factory, 1).id
    # A keep-alive for job 1 is in flight (its transaction holds the row) while the
    # reaper runs: the reaper leaves job 1 alone, and the renewal stands.
    with unit_of_work(factory) as keep_alive:
        assert repository.renew(
            keep_alive,
            queue_id,
            worker="w1",
            status=JobStatus.PULLED,
            runtime_details=None,
            now=utcnow(),
            lease_until=utcnow() + timedelta(seconds=60),
        )
        assert [change[0] for change in _reap(factory, max_retries=5)] == [2]
    assert row(factory, 1).status is JobStatus.PULLED
    assert _reap(factory, max_retries=5) == []


def test_extend_leases_gives_every_lease_at_least_until(
    factory: sessionmaker[Session],
) -> None:
    enqueue(factory, 1, 2, 3)
    lease(factory, limit=1, lease_seconds=600)
    lease(factory, limit=1, lease_seconds=1)
    lease(factory, limit=1, lease_seconds=1)
    _expire_ids = [row(factory, 3).id]
    with unit_of_work(factory) as session:
        session.execute(
            update(QueuedJob)
            .where(QueuedJob.id.in_(_expire_ids))
            .values(lease_expires_at=utcnow() - timedelta(seconds=100))
        )
    until = utcnow() + timedelta(seconds=60)
    with unit_of_work(factory) as session:
        assert repository.extend_leases(session, until=until) == 2
    assert row(factory, 1).lease_expires_at > until  # type: ignore[operator]
    assert row(factory, 2).lease_expires_at == until
    assert row(factory, 3).lease_expires_at == until
    assert _reap(factory, max_retries=5) == []


@pytest.mark.postgres
def test_pull_reads_the_head_of_the_partial_index(
    postgres_factory: sessionmaker[Session],
) -> None:
    # A queue of 20,000 jobs of mixed environments, priorities and GPU needs beside
    # as many finished ones: the pull's plan walks a partial pull index once per
    # branch of the environment rule and sorts nothing but the two candidate lists.
    # A pull that offers no GPU walks the index without GPU jobs.
    factory = postgres_factory
    with unit_of_work(factory) as session:
        session.execute(
            text(
                """
                INSERT INTO queued_jobs (job_id, spec, paths_upload, environment, priority,
                    memory, gpus, status, attempts, failed_workers, created_at, updated_at)
                SELECT g, '{}', '{}',
                    CASE g % 3 WHEN 0 THEN 'cloud' WHEN 1 THEN 'local' END, g % 6,
                    CASE WHEN g % 5 = 0 THEN 16000 ELSE 0 END,
                    CASE WHEN g % 2 = 0 THEN 1 ELSE 0 END,
                    CASE WHEN g <= 20000 THEN 'queued' ELSE 'finished' END,
                    0, '[]', now() - g * interval '1 second', now()
                FROM generate_series(1, 40000) AS g
                """
            )
        )
    with factory() as session:
        session.execute(text("ANALYZE queued_jobs"))
        session.commit()
    plans: list[str] = []

    def explain(
        connection: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        if statement.lstrip().startswith("WITH"):
            cursor.execute("EXPLAIN " + statement, parameters)
            plans.append("\n".join(line for (line,) in cursor.fetchall()))

    engine = factory.kw["bind"]
    gpu_worker = WorkerOffer(name="gpu-box", environment=Environment.LOCAL, memory=8000, gpus=1)
    event.listen(engine, "before_cursor_execute", explain)
    try:
        leased = lease(factory, limit=3)
        leased_with_gpu = lease(factory, gpu_worker, limit=3)
    finally:
        event.remove(engine, "before_cursor_execute", explain)
    assert len(leased) == 3 and all(job_id % 2 == 1 for job_id in leased)
    assert len(leased_with_gpu) == 3
    no_gpu_plan, gpu_plan = plans
    for plan in plans:
        assert "Seq Scan" not in plan and "Bitmap" not in plan, plan
    assert no_gpu_plan.count("Index Scan using ix_queued_jobs_pull_no_gpu ") == 2, no_gpu_plan
    assert gpu_plan.count("Index Scan using ix_queued_jobs_pull ") == 2, gpu_plan
    # The hardware requirements are checked on the index entries (Index Cond), not
    # on table rows read first (Filter).
    for plan in plans:
        lines = plan.splitlines()
        conditions = [line for line in lines if "Index Cond:" in line and "environment" in line]
        assert len(conditions) == 2, plan
        assert all("memory <=" in line and "cpu_cores <=" in line for line in conditions), plan
