"""Live logs in the queue database, on SQLite and PostgreSQL: chunks idempotent by
offset, gaps refused, the per-job bound and its marker, only the holding worker
may ship, a new attempt continues the log, reads from an offset."""

from __future__ import annotations

import pytest
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from labcloud.contract import JobStatus, Progress
from labcloud.db import unit_of_work
from labcloud.errors import NotFound
from tests.worker_api.test_service import enqueue, pull, report, run
from worker_api.logs import service
from worker_api.models import LiveLog, LiveLogChunk

BOUND = 2000


@pytest.fixture(autouse=True)
def _empty(factory: sessionmaker[Session]) -> None:
    # The PostgreSQL database is shared by the session's tests.
    with unit_of_work(factory) as session:
        session.execute(delete(LiveLogChunk))
        session.execute(delete(LiveLog))


def ship(
    factory: sessionmaker[Session],
    queue_id: int,
    offset: int,
    data: bytes,
    *,
    worker: str = "w1",
    run_token: str = "run-1",
    progress: Progress | None = None,
) -> service.Appended:
    return run(
        factory,
        lambda s: service.append(
            s,
            queue_id,
            worker=worker,
            run=run_token,
            offset=offset,
            data=data,
            progress=progress,
            max_bytes=BOUND,
        )[1],
    )


def read(factory: sessionmaker[Session], job_id: int, offset: int = 0) -> service.LogRead:
    return run(factory, lambda s: service.read(s, job_id, offset))


def leased(factory: sessionmaker[Session], job_id: int = 1) -> int:
    enqueue(factory, job_id)
    queue_id = pull(factory)[0].queue_id
    report(factory, queue_id, JobStatus.RUNNING)
    return queue_id


def test_a_chunk_sent_again_is_stored_once(factory: sessionmaker[Session]) -> None:
    queue_id = leased(factory)
    assert ship(factory, queue_id, 0, b"one\n") == service.Appended(4, False)
    # The answer was lost: the runner sends the same bytes, and more, again.
    assert ship(factory, queue_id, 0, b"one\ntwo\n").next_offset == 8
    assert ship(factory, queue_id, 4, b"two\n").next_offset == 8
    found = read(factory, 1)
    assert found.data == b"one\ntwo\n" and found.next_offset == 8 and not found.complete
    assert read(factory, 1, 4).data == b"two\n"
    assert read(factory, 1, 8).data == b""


def test_a_gap_is_refused_with_the_offset_expected(factory: sessionmaker[Session]) -> None:
    queue_id = leased(factory)
    ship(factory, queue_id, 0, b"abc")
    with pytest.raises(service.OffsetGap, match="offset 3"):
        ship(factory, queue_id, 10, b"later")
    assert read(factory, 1).data == b"abc"


def test_a_flood_is_cut_at_the_bound_with_its_marker(factory: sessionmaker[Session]) -> None:
    queue_id = leased(factory)
    offset = 0
    answers = []
    for _ in range(10):
        answers.append(ship(factory, queue_id, offset, b"x" * 500))
        offset += 500
    marker = service.TRUNCATION_MARKER % BOUND
    found = read(factory, 1)
    assert found.data.endswith(marker) and len(found.data) <= BOUND
    assert found.data.startswith(b"x" * (BOUND - len(marker)))
    # Later chunks are acknowledged (the runner moves on) and dropped.
    assert answers[-1] == service.Appended(5000, True)
    with unit_of_work(factory) as session:
        stored = session.scalar(select(func.sum(func.length(LiveLogChunk.data))))
    assert stored == len(found.data)


def test_only_the_worker_holding_the_job_ships_to_it(factory: sessionmaker[Session]) -> None:
    queue_id = leased(factory)
    with pytest.raises(service.LogNotHeld):
        ship(factory, queue_id, 0, b"x", worker="w2")
    with pytest.raises(service.LogNotHeld):
        ship(factory, queue_id + 100, 0, b"x")
    ship(factory, queue_id, 0, b"done\n")
    report(factory, queue_id, JobStatus.FINISHED)
    with pytest.raises(service.LogNotHeld):
        ship(factory, queue_id, 5, b"late\n")
    assert read(factory, 1).complete


def test_progress_is_kept_latest_first(factory: sessionmaker[Session]) -> None:
    queue_id = leased(factory)
    assert run(factory, lambda s: service.progress_of(s, 1)) is None
    ship(factory, queue_id, 0, b"", progress=Progress(fraction=0.25, message="a"))
    ship(factory, queue_id, 0, b"x", progress=Progress(fraction=0.5, message="b"))
    ship(factory, queue_id, 1, b"y")
    found = run(factory, lambda s: service.progress_of(s, 1))
    assert found is not None and found[0] == Progress(fraction=0.5, message="b")


def test_a_new_attempt_continues_the_log(factory: sessionmaker[Session]) -> None:
    queue_id = leased(factory)
    ship(factory, queue_id, 0, b"first try\n")
    # Handed back, then leased again: the new run counts its offsets from 0.
    report(factory, queue_id, JobStatus.QUEUED)
    again = pull(factory)[0].queue_id
    ship(factory, again, 0, b"second try\n", run_token="run-2")
    text = read(factory, 1).data
    assert text.startswith(b"first try\n") and text.endswith(b"second try\n")
    assert b"[LabCloud: the job runs again" in text


def test_an_unknown_job_is_not_found_and_a_quiet_one_is_empty(
    factory: sessionmaker[Session],
) -> None:
    with pytest.raises(NotFound):
        read(factory, 42)
    enqueue(factory, 2)
    found = read(factory, 2)
    assert found.data == b"" and found.next_offset == 0 and not found.complete
