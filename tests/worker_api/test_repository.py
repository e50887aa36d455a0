"""The queue's SQL on SQLite and PostgreSQL: matching, ordering, leasing under
concurrency, guarded transitions, cancellation, reaping, the outbox."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from labcloud.contract import Environment, HardwareSpec, JobStatus
from labcloud.db import unit_of_work, utcnow
from tests.worker_api.conftest import queue_job
from worker_api.models import QueuedJob, StatusOutbox
from worker_api.queue.repository import QueueRepository, StatusChange
from worker_api.queue.schemas import WorkerOffer

WORKER = WorkerOffer(name="w1", environment=Environment.LOCAL, memory=8000, cpu_cores=4)


def enqueue(factory: sessionmaker[Session], *jobs: int, **options: object) -> None:
    with unit_of_work(factory) as session:
        repository = QueueRepository(session)
        for job_id in jobs:
            repository.insert_if_absent(queue_job(job_id, **options), now=utcnow())  # type: ignore[arg-type]


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
        rows = QueueRepository(session).lease(
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
        job = QueueRepository(session).get_by_job_id(job_id)
        assert job is not None
        return job


def test_insert_is_idempotent_and_copies_hardware(factory: sessionmaker[Session]) -> None:
    hardware = HardwareSpec(cpu_cores=2, memory=1000, gpu_mem=500, gpu_model="A100", gpu_archi="x")
    with unit_of_work(factory) as session:
        repository = QueueRepository(session)
        assert repository.insert_if_absent(queue_job(7, hardware=hardware), now=utcnow())
        assert not repository.insert_if_absent(queue_job(7, priority=5), now=utcnow())
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
        (HardwareSpec(gpu_mem=1), {"gpu_mem": 0}, False),
        (HardwareSpec(gpu_mem=4096), {"gpu_mem": 8192}, True),
        (HardwareSpec(gpu_model="A100"), {}, False),
        (HardwareSpec(gpu_model="A100"), {"gpu_model": "V100"}, False),
        (HardwareSpec(gpu_model="A100"), {"gpu_model": "A100"}, True),
        (HardwareSpec(gpu_archi="ampere"), {"gpu_archi": "turing"}, False),
        (HardwareSpec(gpu_archi="ampere"), {"gpu_archi": "ampere"}, True),
        (HardwareSpec(), {"gpu_model": "A100", "gpu_archi": "ampere", "gpu_mem": 8}, True),
    ],
)
def test_hardware_matching(
    factory: sessionmaker[Session], needs: HardwareSpec, offer: dict[str, object], matches: bool
) -> None:
    enqueue(factory, 1, hardware=needs)
    worker = WorkerOffer(
        name="w1",
        environment=Environment.LOCAL,
        memory=int(offer.get("memory", 8000)),  # type: ignore[call-overload]
        cpu_cores=int(offer.get("cpu_cores", 4)),  # type: ignore[call-overload]
        gpu_mem=int(offer.get("gpu_mem", 0)),  # type: ignore[call-overload]
        gpu_model=offer.get("gpu_model"),  # type: ignore[arg-type]
        gpu_archi=offer.get("gpu_archi"),  # type: ignore[arg-type]
    )
    assert lease(factory, worker) == ([1] if matches else [])


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
    total, threads = 200, 4
    enqueue(factory, *range(1, total + 1))
    leased: dict[str, list[int]] = {f"w{n}": [] for n in range(threads)}
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def pull(name: str) -> None:
        offer = WorkerOffer(name=name, environment=Environment.LOCAL, memory=8000)
        try:
            start.wait(timeout=10)
            while batch := lease(factory, offer, limit=3):
                leased[name].extend(batch)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=pull, args=(name,)) for name in leased]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=60)
    assert not errors
    everything = [job for jobs in leased.values() for job in jobs]
    assert sorted(everything) == list(range(1, total + 1))
    with unit_of_work(factory) as session:
        for job in session.scalars(select(QueuedJob)):
            assert job.status is JobStatus.PULLED
            assert job.attempts == 1
            assert job.job_id in leased[job.worker or ""]


def _transition(
    factory: sessionmaker[Session], target: JobStatus, *, worker: str = "w1"
) -> StatusChange | None:
    now = utcnow()
    with unit_of_work(factory) as session:
        queue_id = QueueRepository(session).get_by_job_id(1).id  # type: ignore[union-attr]
        return QueueRepository(session).transition(
            queue_id,
            worker=worker,
            target=target,
            runtime_details=None,
            now=now,
            lease_until=now + timedelta(seconds=60),
        )


def test_transition_is_guarded_by_assignee_and_table(factory: sessionmaker[Session]) -> None:
    enqueue(factory, 1)
    lease(factory)
    assert _transition(factory, JobStatus.RUNNING, worker="intruder") is None
    assert _transition(factory, JobStatus.RUNNING) == StatusChange(1, JobStatus.RUNNING, None)
    # Backwards, or the same status, is not a transition.
    assert _transition(factory, JobStatus.PREPROCESSING) is None
    assert _transition(factory, JobStatus.RUNNING) is None
    assert _transition(factory, JobStatus.FINISHED) == StatusChange(1, JobStatus.FINISHED, None)
    assert row(factory, 1).lease_expires_at is None
    assert _transition(factory, JobStatus.ERROR) is None
    assert row(factory, 1).status is JobStatus.FINISHED


def test_hand_back_clears_worker_without_penalty(factory: sessionmaker[Session]) -> None:
    enqueue(factory, 1)
    lease(factory)
    assert _transition(factory, JobStatus.QUEUED) == StatusChange(1, JobStatus.QUEUED, None)
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
            return QueueRepository(session).renew(
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
        repository = QueueRepository(session)
        assert repository.cancel(1, now=utcnow())
        assert not repository.cancel(1, now=utcnow())
        assert not repository.cancel(99, now=utcnow())
    assert row(factory, 1).status is JobStatus.CANCELED
    assert lease(factory) == [2]


def _expire_leases(factory: sessionmaker[Session]) -> None:
    with unit_of_work(factory) as session:
        session.execute(
            update(QueuedJob)
            .where(QueuedJob.lease_expires_at.is_not(None))
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def _reap(factory: sessionmaker[Session], max_retries: int) -> list[StatusChange]:
    with unit_of_work(factory) as session:
        return QueueRepository(session).reap(now=utcnow(), max_retries=max_retries, timeout=30)


def test_reap_requeues_then_fails(factory: sessionmaker[Session]) -> None:
    enqueue(factory, 1, 2)
    lease(factory, limit=1)
    assert _reap(factory, max_retries=1) == []  # the lease has not expired
    _expire_leases(factory)
    assert _reap(factory, max_retries=1) == [
        StatusChange(
            1,
            JobStatus.QUEUED,
            "worker w1 sent no keep-alive for 30 s; re-queued (attempt 1 of 2)",
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
    assert (change.job_id, change.status) == (1, JobStatus.ERROR)
    assert change.runtime_details is not None
    assert change.runtime_details == (
        "worker w1 sent no keep-alive for 30 s; giving up (silent attempts: 2)"
    )
    job = row(factory, 1)
    assert (job.status, job.worker, job.failed_workers, job.attempts) == (
        JobStatus.ERROR,
        None,
        ["w1"],
        2,
    )
    assert row(factory, 2).status is JobStatus.QUEUED


def test_reap_remembers_each_silent_worker(factory: sessionmaker[Session]) -> None:
    enqueue(factory, 1)
    for name in ("w1", "w2"):
        lease(factory, WorkerOffer(name=name, environment=Environment.LOCAL, memory=8000))
        _expire_leases(factory)
        _reap(factory, max_retries=5)
    assert row(factory, 1).failed_workers == ["w1", "w2"]


def test_outbox_is_read_in_id_order(factory: sessionmaker[Session]) -> None:
    with unit_of_work(factory) as session:
        repository = QueueRepository(session)
        assert repository.first_in_outbox() is None
        repository.add_to_outbox(StatusChange(1, JobStatus.PULLED, None), now=utcnow())
        repository.add_to_outbox(StatusChange(1, JobStatus.RUNNING, "x"), now=utcnow())
    with unit_of_work(factory) as session:
        repository = QueueRepository(session)
        first = repository.first_in_outbox()
        assert first is not None
        assert (first.job_id, first.status) == (1, JobStatus.PULLED)
        repository.remove_from_outbox(first.id)
    with unit_of_work(factory) as session:
        rows = session.scalars(select(StatusOutbox)).all()
        assert [(r.status, r.runtime_details) for r in rows] == [(JobStatus.RUNNING, "x")]
