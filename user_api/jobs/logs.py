"""A job's live log and progress, read on demand from the worker API, which keeps
them (``worker_api.logs``): the user API stores nothing of them.

``read`` answers the log from an offset; ``follow`` yields it as it grows, each
step a short long-poll of the worker API (woken there as soon as a chunk lands),
until the log is complete or ``LOG_FOLLOW_MAX_SECONDS`` passed (the client then
reconnects with the offset it reached). A job the queue does not know (not
delivered yet, or gone) has an empty log, complete once the job has ended.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import anyio
from sqlalchemy.orm import Session, sessionmaker

from labcloud.errors import Unavailable
from user_api.auth.service import AuthenticatedUser
from user_api.clients.worker_api import WorkerApiClient, WorkerApiError
from user_api.jobs import service
from user_api.jobs.schemas import JobProgress, JobRead

# One step of a follow waits this long at the worker API for new bytes.
FOLLOW_STEP_SECONDS = 5.0
# A follow ends after this long; the client reconnects with the offset it reached.
FOLLOW_MAX_SECONDS = 600.0
# Most seconds GET /jobs/{id} waits for the worker API's progress before answering
# without it.
PROGRESS_ANSWER_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class LogAnswer:
    data: bytes
    next_offset: int
    complete: bool
    # False when the queue does not know the job (not delivered yet, or gone).
    queued: bool = True


class LogUnavailable(Unavailable):
    """The worker API, which keeps live logs, did not answer."""


async def _job(factory: sessionmaker[Session], user: AuthenticatedUser, job_id: int) -> JobRead:
    """The caller's job (404 for another user's)."""
    found: JobRead = await anyio.to_thread.run_sync(
        lambda: service.read_job(factory, user=user, job_id=job_id)
    )
    return found


async def _piece(
    client: WorkerApiClient,
    job_id: int,
    offset: int,
    wait: float,
    ended: Callable[[], Awaitable[bool]],
) -> LogAnswer:
    try:
        piece = await client.live_log(job_id, offset, wait=wait)
    except WorkerApiError as exc:
        raise LogUnavailable(f"the live log cannot be read now: {exc}") from exc
    if piece is None:
        return LogAnswer(b"", offset, await ended(), queued=False)
    return LogAnswer(piece.data, piece.next_offset, piece.complete)


async def read(
    factory: sessionmaker[Session],
    client: WorkerApiClient,
    *,
    user: AuthenticatedUser,
    job_id: int,
    offset: int,
) -> LogAnswer:
    """The caller's job's live log from ``offset`` (at most 1 MiB)."""
    job = await _job(factory, user, job_id)

    async def ended() -> bool:
        return job.status.is_terminal

    return await _piece(client, job_id, offset, 0, ended)


async def follow(
    factory: sessionmaker[Session],
    client: WorkerApiClient,
    *,
    user: AuthenticatedUser,
    job_id: int,
    offset: int,
) -> AsyncIterator[bytes]:
    """The caller's job's live log from ``offset``, then its new bytes as they come,
    until it is complete or ``FOLLOW_MAX_SECONDS`` passed. Checks the job is the
    caller's before the first byte (the caller awaits ``__anext__`` through
    ``start_follow``)."""
    await _job(factory, user, job_id)

    async def ended() -> bool:
        return (await _job(factory, user, job_id)).status.is_terminal

    deadline = time.monotonic() + FOLLOW_MAX_SECONDS
    yield b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        try:
            answer = await _piece(
                client, job_id, offset, min(FOLLOW_STEP_SECONDS, remaining), ended
            )
        except LogUnavailable:
            # The stream is already under way: a pause, then the client may see
            # the end and reconnect.
            await anyio.sleep(1)
            continue
        if answer.data:
            yield answer.data
        offset = answer.next_offset
        if answer.complete:
            return
        if not answer.queued:
            # The worker API answered at once (it waits only for a job it knows).
            await anyio.sleep(1)


async def start_follow(stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Run ``stream`` up to its first (empty) step, so that a 404 is an answer, not
    a broken stream; returns the rest."""
    await stream.__anext__()
    return stream


async def progress_of(client: WorkerApiClient, job: JobRead) -> JobRead:
    """``job`` with its tool's latest progress, when the worker API says it in time
    (a job that never started has none)."""
    if job.date_started is None and job.status.is_active:
        return job
    try:
        with anyio.fail_after(PROGRESS_ANSWER_SECONDS):
            report = await client.progress(job.id, answer_within=PROGRESS_ANSWER_SECONDS)
    except (WorkerApiError, TimeoutError):
        return job
    if report is None:
        return job
    return job.model_copy(
        update={
            "progress": JobProgress(
                fraction=report.fraction, message=report.message, updated_at=report.updated_at
            )
        }
    )
