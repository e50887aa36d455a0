"""Live logs: appending a runner's chunks and reading them back.

A runner ships its run's output in order, each chunk with the offset of its first
byte in that run's output (``append``). The offset makes a shipment idempotent: a
chunk sent again after a lost answer is stored once, and a gap (a chunk lost in
between) is refused with the offset the worker API expects. Each run of a job
(a new attempt, or the same one leased again after a hand-back) sends its own
token and starts its offsets at 0; its bytes follow the earlier runs' under a
marker line. A job's log is bounded by ``max_bytes``: the chunk that reaches the bound is
cut, the truncation marker ends the log, and later chunks are acknowledged and
dropped, so a flood can neither fill the database nor make its runner retry.

Only the worker that holds the job may ship to it (404 otherwise, as for status
reports). Readers (``read``) get the bytes from an offset, the next offset, and
whether the log is complete: the job ended, and so its runner shipped everything
(the runner ships its last chunk before it reports the job's last status).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from labcloud.contract import LEASED_STATUSES, TERMINAL_STATUSES, Progress
from labcloud.db import utcnow
from labcloud.errors import Conflict, NotFound
from worker_api.models import LiveLog, LiveLogChunk, QueuedJob

# Ends a log that reached its bound; the final log file keeps everything.
TRUNCATION_MARKER = (
    b"\n[LabCloud: the live log reached its limit of %d bytes; later output is in the "
    b"job's final log file]\n"
)
# Most bytes one read answers.
MAX_READ_BYTES = 1024 * 1024


class LogNotHeld(NotFound):
    """The job is not held by this worker (or does not exist)."""


class OffsetGap(Conflict):
    """The chunk starts after the bytes stored for this run: one was lost."""


@dataclass(frozen=True, slots=True)
class Appended:
    """Where the runner's output stands after a shipment: the offset (in the
    run's output) it may send next, and whether later output is dropped."""

    next_offset: int
    truncated: bool


@dataclass(frozen=True, slots=True)
class LogRead:
    """Bytes of a live log from an offset, the offset that follows them, whether
    the log is complete, and the latest progress."""

    data: bytes
    next_offset: int
    complete: bool
    progress: Progress | None
    progress_at: datetime | None


def _marker(max_bytes: int) -> bytes:
    return TRUNCATION_MARKER % max_bytes


def _run_marker(attempt: int) -> bytes:
    return b"\n[LabCloud: the job runs again (attempt %d)]\n" % attempt


def append(
    session: Session,
    queue_id: int,
    *,
    worker: str,
    run: str,
    offset: int,
    data: bytes,
    progress: Progress | None,
    max_bytes: int,
) -> tuple[int, Appended]:
    """Store ``data``, the output of the run ``run`` (its runner's token) from
    ``offset``, and the latest ``progress``; returns the job's user API id and
    where the runner stands."""
    job = session.execute(
        select(QueuedJob.job_id, QueuedJob.attempts).where(
            QueuedJob.id == queue_id,
            QueuedJob.worker == worker,
            QueuedJob.status.in_(LEASED_STATUSES),
        )
    ).one_or_none()
    if job is None:
        raise LogNotHeld(f"job {queue_id} is not held by this worker")
    job_id, attempt = job.job_id, job.attempts
    now = utcnow()
    log = session.execute(
        select(LiveLog).where(LiveLog.job_id == job_id).with_for_update()
    ).scalar_one_or_none()
    if log is None:
        log = LiveLog(job_id=job_id, size=0, truncated=False, run=run, run_base=0, updated_at=now)
        session.add(log)
    elif log.run != run:
        # A new run: its offsets start at 0 after what the earlier ones left.
        log.run = run
        if not log.truncated:
            _store(session, log, _run_marker(attempt), max_bytes)
        log.run_base = log.size
    if progress is not None:
        log.progress_fraction = progress.fraction
        log.progress_message = progress.message
        log.progress_at = now
    log.updated_at = now
    stored = log.size - log.run_base
    if log.truncated:
        # Acknowledged and dropped: the runner must not retry a flood.
        return job_id, Appended(next_offset=offset + len(data), truncated=True)
    if offset > stored:
        raise OffsetGap(f"the live log of job {queue_id} continues at offset {stored}")
    fresh = data[stored - offset :]
    if fresh:
        _store(session, log, fresh, max_bytes)
    return job_id, Appended(next_offset=offset + len(data), truncated=log.truncated)


def _store(session: Session, log: LiveLog, data: bytes, max_bytes: int) -> None:
    """Append ``data`` to the log, cut with the marker where it would pass the bound."""
    marker = _marker(max_bytes)
    room = max_bytes - len(marker) - log.size
    if len(data) > room:
        data = data[: max(room, 0)] + marker
        log.truncated = True
    if not data:
        return
    session.add(
        LiveLogChunk(job_id=log.job_id, start=log.size, end=log.size + len(data), data=data)
    )
    log.size += len(data)


def read(session: Session, job_id: int, offset: int) -> LogRead:
    """The live log of the job with this user API id from ``offset`` (at most
    ``MAX_READ_BYTES``). 404 when the queue does not know the job."""
    status = session.execute(
        select(QueuedJob.status).where(QueuedJob.job_id == job_id)
    ).scalar_one_or_none()
    if status is None:
        raise NotFound(f"job {job_id} is not in the queue")
    log = session.get(LiveLog, job_id)
    ended = status in TERMINAL_STATUSES
    if log is None:
        return LogRead(b"", offset, ended, None, None)
    chunks = session.execute(
        select(LiveLogChunk.start, LiveLogChunk.data)
        .where(LiveLogChunk.job_id == job_id, LiveLogChunk.end > offset)
        .order_by(LiveLogChunk.end)
    ).all()
    parts: list[bytes] = []
    taken = 0
    position = offset
    for start, data in chunks:
        piece = bytes(data)[max(0, position - start) :][: MAX_READ_BYTES - taken]
        if not piece:
            break
        parts.append(piece)
        taken += len(piece)
        position += len(piece)
        if taken >= MAX_READ_BYTES:
            break
    progress = None
    if log.progress_at is not None:
        progress = Progress(fraction=log.progress_fraction, message=log.progress_message)
    next_offset = max(position, offset)
    return LogRead(
        b"".join(parts),
        next_offset,
        ended and next_offset >= log.size,
        progress,
        log.progress_at,
    )


class LogSignals:
    """Wakes readers waiting for a job's new bytes in this process as soon as a
    chunk is committed (chunks arrive on worker threads, readers wait on the event
    loop); readers also read again every second for chunks other processes took."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[int, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def notify(self, job_id: int) -> None:
        with self._lock:
            waiters = self._waiting.pop(job_id, [])
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    async def wait(self, job_id: int, seconds: float) -> None:
        event = asyncio.Event()
        entry = (asyncio.get_running_loop(), event)
        with self._lock:
            self._waiting.setdefault(job_id, []).append(entry)
        try:
            await asyncio.wait_for(event.wait(), seconds)
        except TimeoutError:
            pass
        finally:
            with self._lock:
                waiters = self._waiting.get(job_id)
                if waiters is not None and entry in waiters:
                    waiters.remove(entry)
                    if not waiters:
                        del self._waiting[job_id]


def progress_of(session: Session, job_id: int) -> tuple[Progress, datetime] | None:
    """The job's latest progress and when it came; ``None`` when none came."""
    row = session.execute(
        select(LiveLog.progress_fraction, LiveLog.progress_message, LiveLog.progress_at).where(
            LiveLog.job_id == job_id
        )
    ).one_or_none()
    if row is None or row.progress_at is None:
        return None
    return Progress(fraction=row.progress_fraction, message=row.progress_message), row.progress_at
