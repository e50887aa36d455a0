"""Live log routes: a runner ships its run's output (``POST /jobs/{queue_id}/log``);
the user API reads a job's log back and its progress (internal key)."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Annotated

import anyio
from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel
from sqlalchemy.orm import Session, sessionmaker

from labcloud.contract import (
    LOG_COMPLETE_HEADER,
    LOG_NEXT_OFFSET_HEADER,
    PROGRESS_MESSAGE_CHARS,
    Progress,
)
from labcloud.db import unit_of_work
from labcloud.errors import PayloadTooLarge
from labcloud.web import INT64_MAX, IdPath
from worker_api.dependencies import CurrentWorker, InternalCaller, SessionDep, SettingsDep
from worker_api.logs import service
from worker_api.queue.policy import after_commit

router = APIRouter(tags=["logs"])
internal_router = APIRouter(tags=["internal"], dependencies=[InternalCaller])

# How often a waiting read looks at the database for chunks another process took.
READ_AGAIN_SECONDS = 1.0


def _signals(request: Request) -> service.LogSignals:
    state = request.app.state
    signals: service.LogSignals | None = getattr(state, "live_log_signals", None)
    if signals is None:
        signals = state.live_log_signals = service.LogSignals()
    return signals


class ShipAnswer(BaseModel):
    """Where the runner stands: the offset to send next; ``truncated``: the log
    reached its bound, later output is dropped (the runner may stop shipping)."""

    next_offset: int
    truncated: bool


@router.post("/jobs/{queue_id}/log", response_model=ShipAnswer)
async def ship_log(
    request: Request,
    queue_id: IdPath,
    worker: CurrentWorker,
    settings: SettingsDep,
    offset: Annotated[
        int,
        Query(
            ge=0, le=INT64_MAX, description="Offset of the body's first byte in the run's output."
        ),
    ],
    run: Annotated[
        str,
        Query(
            max_length=64,
            description="Token of the run the output is from (its offsets start at 0).",
        ),
    ] = "",
    progress: Annotated[
        float | None, Query(ge=0, le=1, description="Latest progress fraction.")
    ] = None,
    progress_message: Annotated[str | None, Query(max_length=PROGRESS_MESSAGE_CHARS)] = None,
) -> ShipAnswer:
    """Extension: append the body (``application/octet-stream``, the run's output
    from ``offset``) to the job's live log, with the tool's latest progress when
    given. Idempotent by offset; 409 when bytes before ``offset`` are missing (the
    answer names the offset expected), 404 when the worker does not hold the job,
    413 for a chunk over LIVE_LOG_MAX_CHUNK_BYTES."""
    limit = settings.live_log_max_chunk_bytes
    too_large = PayloadTooLarge(f"a live log chunk is at most {limit:,} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_large
    reported = None
    if progress is not None or progress_message is not None:
        reported = Progress(fraction=progress, message=progress_message)
    factory: sessionmaker[Session] = request.app.state.session_factory
    signals = _signals(request)

    def store() -> service.Appended:
        with unit_of_work(factory) as session:
            job_id, appended = service.append(
                session,
                queue_id,
                worker=worker.name,
                run=run,
                offset=offset,
                data=bytes(body),
                progress=reported,
                max_bytes=settings.live_log_max_bytes,
            )
            after_commit(session, lambda: signals.notify(job_id))
            return appended

    appended = await anyio.to_thread.run_sync(store)
    return ShipAnswer(next_offset=appended.next_offset, truncated=appended.truncated)


@internal_router.get("/_jobs/{job_id}/log")
async def read_log(
    request: Request,
    job_id: IdPath,
    settings: SettingsDep,
    offset: Annotated[int, Query(ge=0, le=INT64_MAX)] = 0,
    wait: Annotated[float, Query(ge=0, le=60, description="Seconds to wait for new bytes.")] = 0,
) -> Response:
    """The live log of the job with this user API id from ``offset`` (at most 1 MiB),
    as ``text/plain``, with ``X-Log-Next-Offset`` and ``X-Log-Complete``. With
    ``wait``, answers as soon as bytes after ``offset`` arrive or the log is
    complete (at most LIVE_LOG_MAX_WAIT_SECONDS). 404 when the queue does not know
    the job."""
    factory: sessionmaker[Session] = request.app.state.session_factory
    signals = _signals(request)
    deadline = time.monotonic() + min(wait, settings.live_log_max_wait_seconds)

    def fetch() -> service.LogRead:
        with unit_of_work(factory) as session:
            return service.read(session, job_id, offset)

    while True:
        found = await anyio.to_thread.run_sync(fetch)
        remaining = deadline - time.monotonic()
        if found.data or found.complete or remaining <= 0:
            break
        await signals.wait(job_id, min(remaining, READ_AGAIN_SECONDS))
    return Response(
        content=found.data,
        media_type="text/plain; charset=utf-8",
        headers={
            LOG_NEXT_OFFSET_HEADER: str(found.next_offset),
            LOG_COMPLETE_HEADER: "true" if found.complete else "false",
        },
    )


class ProgressRead(BaseModel):
    """A job's latest progress report."""

    fraction: float | None
    message: str | None
    updated_at: datetime


@internal_router.get("/_jobs/{job_id}/progress", response_model=ProgressRead | None)
def read_progress(job_id: IdPath, session: SessionDep) -> ProgressRead | None:
    """The latest progress the job's tool reported; ``null`` when none."""
    found = service.progress_of(session, job_id)
    if found is None:
        return None
    progress, at = found
    return ProgressRead(fraction=progress.fraction, message=progress.message, updated_at=at)
