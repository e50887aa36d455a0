"""Queue rules on SQLite and PostgreSQL: status reports (keep-alive, transitions,
hand-back, refusals, outcomes), the outbox rows they write, wake-ups after commit,
reaping, the long-polling pull."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
from sqlalchemy import event, select, update
from sqlalchemy.orm import Session, sessionmaker

from labcloud.contract import Environment, FailureKind, JobStatus, Outcome
from labcloud.db import unit_of_work, utcnow
from labcloud.outbox import register_waker
from labcloud.storage import LocalStorage, Storage
from tests.worker_api.conftest import queue_job
from worker_api.models import QueuedJob, StatusOutbox
from worker_api.queue import service
from worker_api.queue.lifecycle import STATUS_OUTBOX
from worker_api.queue.policy import QueuePolicy, QueueSignals
from worker_api.queue.reaper import reap_once, run_reaper
from worker_api.queue.schemas import WorkerOffer
from worker_api.queue.service import InvalidTransition, JobNotFound, JobPuller, Wakeup

POLICY = QueuePolicy(lease_seconds=60, max_retries=1)
WORKER = WorkerOffer(name="w1", environment=Environment.LOCAL, memory=8000)
T = TypeVar("T")


class Counter:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def run(factory: sessionmaker[Session], action: Callable[[Session], T]) -> T:
    with unit_of_work(factory) as session:
        return action(session)


def enqueue(
    factory: sessionmaker[Session], job_id: int, signals: QueueSignals | None = None, **options: Any
) -> QueuedJob:
    job = queue_job(job_id, **options)
    return run(factory, lambda s: service.enqueue(s, job, signals=signals or QueueSignals()))


def pull(
    factory: sessionmaker[Session],
    offer: WorkerOffer = WORKER,
    policy: QueuePolicy = POLICY,
    limit: int = 1,
) -> list[service.LeasedJob]:
    return run(
        factory, lambda s: service.lease_jobs(s, offer, policy=policy, limit=limit, older_than=0)
    )


def cancel(
    factory: sessionmaker[Session],
    job_id: int,
    policy: QueuePolicy = POLICY,
    *,
    discard_outputs: bool = False,
) -> bool:
    return run(
        factory,
        lambda s: service.cancel(s, job_id, policy=policy, discard_outputs=discard_outputs),
    )


def outbox(factory: sessionmaker[Session]) -> list[tuple[int, str, str | None]]:
    with unit_of_work(factory) as session:
        return [
            (row.job_id, row.status.value, row.runtime_details)
            for row in session.scalars(select(StatusOutbox).order_by(StatusOutbox.id))
        ]


def queued(factory: sessionmaker[Session], job_id: int = 1) -> QueuedJob:
    with unit_of_work(factory) as session:
        job = session.scalars(select(QueuedJob).where(QueuedJob.job_id == job_id)).one()
        return job


def leased_queue_id(factory: sessionmaker[Session], job_id: int = 1) -> int:
    enqueue(factory, job_id)
    return pull(factory)[0].queue_id


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait (at most 5 s) until ``condition`` holds."""
    with anyio.fail_after(5):
        # Polls the database, which has no event to wait on.
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.01)


def report(
    factory: sessionmaker[Session],
    queue_id: int,
    status: JobStatus,
    *,
    worker: str = "w1",
    details: str | None = None,
    outcome: Outcome | None = None,
) -> None:
    run(
        factory,
        lambda s: service.report_status(
            s,
            queue_id,
            policy=POLICY,
            worker=worker,
            status=status,
            runtime_details=details,
            outcome=outcome,
        ),
    )


@pytest.fixture
def status_wakes() -> Iterator[Counter]:
    """How often a commit woke the status relay of this process."""
    wakes = Counter()
    unregister = register_waker(STATUS_OUTBOX, wakes)
    try:
        yield wakes
    finally:
        unregister()


def test_enqueue_is_idempotent_and_signals_only_new_jobs(factory: sessionmaker[Session]) -> None:
    enqueued = Counter()
    signals = QueueSignals(job_enqueued=enqueued)
    first = enqueue(factory, 5, signals)
    again = enqueue(factory, 5, signals, priority=4)
    assert (again.id, again.priority, again.status) == (first.id, 0, JobStatus.QUEUED)
    assert enqueued.count == 1
    assert outbox(factory) == []


def test_signals_fire_only_after_commit(factory: sessionmaker[Session]) -> None:
    enqueued = Counter()
    with pytest.raises(RuntimeError), unit_of_work(factory) as session:
        service.enqueue(session, queue_job(1), signals=QueueSignals(job_enqueued=enqueued))
        raise RuntimeError("rolled back")
    assert enqueued.count == 0
    with unit_of_work(factory) as session:
        assert session.scalars(select(QueuedJob)).first() is None


def test_lease_returns_specs_and_records_pulled(
    factory: sessionmaker[Session], status_wakes: Counter
) -> None:
    enqueue(factory, 1)
    [job] = pull(factory, limit=5)
    assert job.spec == queue_job(1).job
    assert outbox(factory) == [(1, "pulled", None)]
    assert status_wakes.count == 1


def test_status_reports_follow_the_state_machine(factory: sessionmaker[Session]) -> None:
    queue_id = leased_queue_id(factory)
    for status in (JobStatus.PREPROCESSING, JobStatus.RUNNING):
        report(factory, queue_id, status)
    lease_before = queued(factory).lease_expires_at
    report(factory, queue_id, JobStatus.RUNNING, details="50%")  # keep-alive
    job = queued(factory)
    assert job.lease_expires_at is not None and lease_before is not None
    assert job.lease_expires_at > lease_before
    assert job.runtime_details == "50%"
    with pytest.raises(InvalidTransition, match="from running to preprocessing"):
        report(factory, queue_id, JobStatus.PREPROCESSING)
    report(factory, queue_id, JobStatus.POSTPROCESSING)
    report(factory, queue_id, JobStatus.FINISHED, details="exit 0")
    report(factory, queue_id, JobStatus.FINISHED, details="exit 0")  # repeated: no-op
    with pytest.raises(InvalidTransition, match="from finished to running"):
        report(factory, queue_id, JobStatus.RUNNING)
    assert queued(factory).lease_expires_at is None
    assert outbox(factory) == [
        (1, "pulled", None),
        (1, "preprocessing", None),
        (1, "running", None),
        (1, "postprocessing", "50%"),
        (1, "finished", "exit 0"),
    ]


def outcomes(factory: sessionmaker[Session]) -> list[tuple[str, dict[str, object] | None]]:
    with unit_of_work(factory) as session:
        return [
            (row.status.value, row.outcome)
            for row in session.scalars(select(StatusOutbox).order_by(StatusOutbox.id))
        ]


def test_an_outcome_goes_with_the_end_and_its_attempt_is_counted_here(
    factory: sessionmaker[Session], storage: LocalStorage
) -> None:
    queue_id = leased_queue_id(factory)
    _expire(factory)
    reap_once(factory, POLICY, QueueSignals(), storage)  # re-queued: the next lease is attempt 2
    [job] = pull(factory)
    said = Outcome(exit_code=0, attempt=1, log_tail="done")
    report(factory, job.queue_id, JobStatus.RUNNING, outcome=said)
    report(factory, job.queue_id, JobStatus.FINISHED, outcome=said)
    assert outcomes(factory)[-3:] == [
        ("pulled", None),
        ("running", None),
        ("finished", {"exit_code": 0, "attempt": 2, "log_tail": "done"}),
    ]
    assert queue_id == job.queue_id


def test_a_job_given_up_by_the_reaper_is_lost(
    factory: sessionmaker[Session], storage: LocalStorage
) -> None:
    leased_queue_id(factory)
    _expire(factory)
    reap_once(factory, QueuePolicy(lease_seconds=60, max_retries=0), QueueSignals(), storage)
    status, outcome = outcomes(factory)[-1]
    assert status == "error"
    assert outcome is not None
    assert Outcome.model_validate(outcome).failure is FailureKind.LOST
    assert (outcome["attempt"], set(outcome)) == (1, {"failure", "attempt", "ended_at"})


def test_status_changes_wake_the_relay_once_committed(
    factory: sessionmaker[Session], status_wakes: Counter
) -> None:
    queue_id = leased_queue_id(factory)
    assert status_wakes.count == 1
    with pytest.raises(RuntimeError), unit_of_work(factory) as session:
        service.report_status(
            session,
            queue_id,
            policy=POLICY,
            worker="w1",
            status=JobStatus.RUNNING,
            runtime_details=None,
        )
        raise RuntimeError("rolled back")
    report(factory, queue_id, JobStatus.PULLED)  # a keep-alive tells nobody
    assert cancel(factory, 1)  # the user API cancelled: it knows
    assert status_wakes.count == 1
    assert outbox(factory) == [(1, "pulled", None)]


def test_a_report_that_ends_the_job_costs_three_statements(factory: sessionmaker[Session]) -> None:
    """The keep-alive's guarded renewal (which finds another status), the guarded
    move, the outbox row: no read in between."""
    queue_id = leased_queue_id(factory)
    statements: list[str] = []

    def count(_connection: object, _cursor: object, statement: str, *_args: object) -> None:
        statements.append(statement.split()[0].upper())

    engine = factory.kw["bind"]
    event.listen(engine, "before_cursor_execute", count)
    try:
        with unit_of_work(factory) as session:
            session.connection()  # the transaction's own BEGIN is not a statement of the report
            statements.clear()
            service.report_status(
                session,
                queue_id,
                policy=POLICY,
                worker="w1",
                status=JobStatus.FINISHED,
                runtime_details="exit 0",
                outcome=Outcome(exit_code=0),
            )
            reported = list(statements)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert reported == ["UPDATE", "UPDATE", "INSERT"]


def test_phases_may_be_skipped(factory: sessionmaker[Session]) -> None:
    queue_id = leased_queue_id(factory)
    report(factory, queue_id, JobStatus.RUNNING)
    report(factory, queue_id, JobStatus.ERROR, details="exit 1")
    assert queued(factory).status is JobStatus.ERROR


def test_only_the_assignee_may_report(factory: sessionmaker[Session]) -> None:
    queue_id = leased_queue_id(factory)
    with pytest.raises(JobNotFound):
        report(factory, queue_id, JobStatus.RUNNING, worker="w2")
    with pytest.raises(JobNotFound):
        report(factory, queue_id + 100, JobStatus.RUNNING)
    assert queued(factory).status is JobStatus.PULLED


def test_cancelled_job_tells_its_worker_to_stop(factory: sessionmaker[Session]) -> None:
    queue_id = leased_queue_id(factory)
    assert cancel(factory, 1) is True
    assert cancel(factory, 1) is False
    assert cancel(factory, 404) is False
    with pytest.raises(JobNotFound):
        report(factory, queue_id, JobStatus.PULLED)
    with pytest.raises(JobNotFound):
        report(factory, queue_id, JobStatus.FINISHED)
    assert queued(factory).status is JobStatus.CANCELED


def test_cancel_keeps_a_log_window_unless_outputs_are_discarded(
    factory: sessionmaker[Session],
) -> None:
    policy = QueuePolicy(lease_seconds=60, cancel_log_grace_seconds=120)
    queue_id = leased_queue_id(factory)
    before = utcnow()
    assert cancel(factory, 1, policy) is True
    window = queued(factory).log_upload_until
    assert window is not None
    assert before + timedelta(seconds=119) < window < utcnow() + timedelta(seconds=121)
    with pytest.raises(JobNotFound):  # keep-alives are refused at once
        report(factory, queue_id, JobStatus.RUNNING)
    # Deleting the job afterwards discards what the cancellation kept.
    assert cancel(factory, 1, policy, discard_outputs=True) is False
    assert queued(factory).log_upload_until is None
    # No grace configured: no window.
    enqueue(factory, 2)
    pull(factory)
    no_grace = QueuePolicy(cancel_log_grace_seconds=0)
    assert cancel(factory, 2, no_grace) is True
    assert queued(factory, 2).log_upload_until is None
    assert [status for _job, status, _ in outbox(factory)] == ["pulled", "pulled"]


def test_hand_back_requeues_for_anyone(factory: sessionmaker[Session]) -> None:
    queue_id = leased_queue_id(factory)
    report(factory, queue_id, JobStatus.QUEUED)
    job = queued(factory)
    assert (job.status, job.worker, job.attempts) == (JobStatus.QUEUED, None, 0)
    with pytest.raises(JobNotFound):
        report(factory, queue_id, JobStatus.RUNNING)
    assert outbox(factory)[-1] == (1, "queued", None)
    assert len(pull(factory)) == 1


def test_hand_back_refused_while_uploading(factory: sessionmaker[Session]) -> None:
    queue_id = leased_queue_id(factory)
    report(factory, queue_id, JobStatus.POSTPROCESSING)
    with pytest.raises(InvalidTransition):
        report(factory, queue_id, JobStatus.QUEUED)


def test_status_of(factory: sessionmaker[Session]) -> None:
    queue_id = leased_queue_id(factory)
    assert run(factory, lambda s: service.status_of(s, queue_id)) is JobStatus.PULLED
    with pytest.raises(JobNotFound):
        run(factory, lambda s: service.status_of(s, queue_id + 1))


def _expire(factory: sessionmaker[Session]) -> None:
    with unit_of_work(factory) as session:
        session.execute(update(QueuedJob).values(lease_expires_at=utcnow() - timedelta(seconds=1)))


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    (tmp_path / "storage").mkdir()
    return LocalStorage(tmp_path / "storage")


def _write(storage: Storage, key: str, text: str = "x") -> None:
    storage.write(key, io.BytesIO(text.encode()))


def _files(storage: Storage, user: str = "u1") -> list[str]:
    return [entry.key for entry in storage.iter_files(user)]


def test_reaper_requeues_then_fails_and_records(
    factory: sessionmaker[Session], storage: LocalStorage, status_wakes: Counter
) -> None:
    enqueued = Counter()
    signals = QueueSignals(job_enqueued=enqueued)
    queue_id = leased_queue_id(factory)
    _expire(factory)
    assert reap_once(factory, POLICY, signals, storage) == 1
    assert enqueued.count == 1  # waiting pulls see the job at once
    with pytest.raises(JobNotFound):  # the silent worker comes back too late
        report(factory, queue_id, JobStatus.RUNNING)
    wakes_before = status_wakes.count
    pull(factory)
    _expire(factory)
    assert reap_once(factory, POLICY, signals, storage) == 1
    assert reap_once(factory, POLICY, signals, storage) == 0
    requeued = (
        "worker w1 sent no keep-alive for 60 s (attempt 1 of 2, pulled); "
        "re-queued for attempt 2 of 2"
    )
    assert outbox(factory) == [
        (1, "pulled", None),
        (1, "queued", requeued),
        (1, "pulled", requeued),  # attempt 2 says why it exists until its worker reports
        (1, "error", "worker w1 sent no keep-alive for 60 s (attempt 2 of 2, pulled); giving up"),
    ]
    assert status_wakes.count == wakes_before + 2  # the lease, then the end


def test_reaper_removes_partial_results_before_the_next_attempt_can_start(
    factory: sessionmaker[Session], storage: LocalStorage
) -> None:
    """The failed attempt's results are deleted while nobody holds the job, and only
    then is it re-queued: a new attempt's uploads cannot be deleted."""
    queue_id = leased_queue_id(factory)
    report(factory, queue_id, JobStatus.RUNNING)
    for key in ("u1/output/job1/partial.txt", "u1/output/job1/sub/more.txt", "u1/log/job1/log.txt"):
        _write(storage, key)
    _write(storage, "u1/output/job10/other.txt")  # another job's results stay
    _write(storage, "u1/data/job1/input.txt")  # the user's own files stay
    _expire(factory)
    deleting, release = threading.Event(), threading.Event()
    seen_while_deleting: list[object] = []

    class SlowStorage(LocalStorage):
        def delete(self, key: str) -> None:
            deleting.set()
            assert release.wait(timeout=60)
            super().delete(key)

    slow = SlowStorage(storage.root)
    with ThreadPoolExecutor(1) as pool:
        reaping = pool.submit(reap_once, factory, POLICY, QueueSignals(), slow)
        assert deleting.wait(timeout=60)
        seen_while_deleting.append(pull(factory))
        seen_while_deleting.append(outbox(factory)[-1][1])
        release.set()
        assert reaping.result(timeout=60) == 1
    assert seen_while_deleting == [[], "running"]
    assert _files(storage) == ["u1/data/job1/input.txt", "u1/output/job10/other.txt"]
    assert [job.queue_id for job in pull(factory)] == [queue_id]


def test_a_failed_deletion_keeps_the_job_held_and_is_retried(
    factory: sessionmaker[Session], storage: LocalStorage
) -> None:
    queue_id = leased_queue_id(factory)
    _write(storage, "u1/output/job1/partial.txt")
    _expire(factory)

    class BrokenStorage(LocalStorage):
        def delete(self, key: str) -> None:
            raise OSError("storage away")

    assert reap_once(factory, POLICY, QueueSignals(), BrokenStorage(storage.root)) == 0
    held = queued(factory)
    assert (held.status, held.worker) == (JobStatus.PULLED, None)
    assert pull(factory) == []
    _expire(factory)  # the hold ends: the next pass retries
    assert reap_once(factory, POLICY, QueueSignals(), storage) == 1
    assert queued(factory).status is JobStatus.QUEUED
    assert _files(storage) == []
    assert [status for _job, status, _details in outbox(factory)] == ["pulled", "queued"]
    assert queue_id == queued(factory).id


def test_a_job_silent_while_uploading_ends_error_and_keeps_its_results(
    factory: sessionmaker[Session], storage: LocalStorage
) -> None:
    """``postprocessing`` may not go back to ``queued``: with retries left, the job
    ends ``error`` saying why, and what it uploaded stays for its owner."""
    queue_id = leased_queue_id(factory)
    report(factory, queue_id, JobStatus.RUNNING)
    report(factory, queue_id, JobStatus.POSTPROCESSING)
    _write(storage, "u1/output/job1/result.txt")
    _expire(factory)
    assert (
        reap_once(factory, QueuePolicy(lease_seconds=60, max_retries=5), QueueSignals(), storage)
        == 1
    )
    assert queued(factory).status is JobStatus.ERROR
    assert outbox(factory)[-1] == (
        1,
        "error",
        "worker w1 sent no keep-alive for 60 s (attempt 1 of 6, postprocessing); "
        "giving up: it had started uploading its results, so it is not run again",
    )
    assert _files(storage) == ["u1/output/job1/result.txt"]


def test_retry_different_policy(factory: sessionmaker[Session], storage: LocalStorage) -> None:
    policy = QueuePolicy(lease_seconds=60, max_retries=3, retry_different=True)
    leased_queue_id(factory)
    _expire(factory)
    reap_once(factory, policy, QueueSignals(), storage)
    assert pull(factory, policy=policy) == []
    other = WorkerOffer(name="w2", environment=Environment.LOCAL, memory=8000)
    assert len(pull(factory, other, policy=policy)) == 1


@pytest.mark.anyio
async def test_reaper_loop_runs_until_cancelled(
    factory: sessionmaker[Session], storage: LocalStorage
) -> None:
    leased_queue_id(factory)
    _expire(factory)
    # The start gives the expired lease 0.2 s more; then the loop takes it back.
    short = QueuePolicy(lease_seconds=0.2, max_retries=1)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(
            lambda: run_reaper(factory, short, QueueSignals(), storage, interval_seconds=0.01)
        )
        await eventually(lambda: queued(factory).status is JobStatus.QUEUED)
        tasks.cancel_scope.cancel()


@pytest.mark.anyio
async def test_reaper_start_forgives_leases_that_ran_out_during_an_outage(
    factory: sessionmaker[Session], storage: LocalStorage
) -> None:
    # The lease ran out while no worker API was running, so its worker's keep-alives
    # had nowhere to go: a starting reaper gives it a full lease instead of failing it.
    leased_queue_id(factory)
    _expire(factory)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(
            lambda: run_reaper(factory, POLICY, QueueSignals(), storage, interval_seconds=0.01)
        )
        await eventually(
            lambda: queued(factory).lease_expires_at > utcnow() + timedelta(seconds=50)  # type: ignore[operator]
        )
        await anyio.sleep(0.1)
        tasks.cancel_scope.cancel()
    assert queued(factory).status is JobStatus.PULLED
    assert outbox(factory) == [(1, "pulled", None)]


@pytest.mark.anyio
async def test_long_poll_wakes_on_enqueue(factory: sessionmaker[Session]) -> None:
    wakeup = Wakeup()
    signals = QueueSignals(job_enqueued=wakeup.notify)
    # Re-checks so rare that only the wake-up can explain a quick answer.
    puller = JobPuller(factory, POLICY, wakeup, recheck_seconds=60)

    async def enqueue_later() -> None:
        await anyio.sleep(0.2)
        await anyio.to_thread.run_sync(enqueue, factory, 1, signals)

    started = time.monotonic()
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(enqueue_later)
        leased = await puller.pull(WORKER, limit=1, older_than=0, wait=10)
    assert [job.spec.meta.job_id for job in leased] == [1]
    assert time.monotonic() - started < 2


@pytest.mark.anyio
async def test_long_poll_rechecks_for_other_processes(factory: sessionmaker[Session]) -> None:
    wakeup = Wakeup()
    puller = JobPuller(factory, POLICY, wakeup, recheck_seconds=0.05)

    async def enqueue_elsewhere() -> None:
        await anyio.sleep(0.1)
        # No signal: as if another API process had enqueued the job.
        await anyio.to_thread.run_sync(enqueue, factory, 1)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(enqueue_elsewhere)
        leased = await puller.pull(WORKER, limit=1, older_than=0, wait=10)
    assert len(leased) == 1


@pytest.mark.anyio
async def test_long_poll_gives_up_after_wait(factory: sessionmaker[Session]) -> None:
    puller = JobPuller(factory, POLICY, Wakeup(), recheck_seconds=0.05)
    started = time.monotonic()
    assert await puller.pull(WORKER, limit=1, older_than=0, wait=0.2) == []
    assert 0.2 <= time.monotonic() - started < 2
    assert await puller.pull(WORKER, limit=1, older_than=0, wait=0) == []


@pytest.mark.anyio
async def test_long_poll_stops_when_the_caller_hung_up(factory: sessionmaker[Session]) -> None:
    puller = JobPuller(factory, POLICY, Wakeup(), recheck_seconds=0.05)

    async def gone() -> bool:
        return True

    started = time.monotonic()
    assert await puller.pull(WORKER, limit=1, older_than=0, wait=10, caller_gone=gone) == []
    assert time.monotonic() - started < 2
