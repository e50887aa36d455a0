"""Job routes (contract section 1) and the worker API's status callback."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from labcloud.contract import JobStatus, StatusUpdate
from labcloud.errors import BadRequest
from labcloud.web import MAX_OFFSET, IdPath
from user_api.dependencies import (
    CatalogStoreDep,
    CurrentUser,
    CurrentUserBeforeWrites,
    CurrentUserOutsideTransactions,
    InternalCaller,
    SessionDep,
    SettingsDep,
    StorageDep,
    WorkerApiDep,
)
from user_api.jobs import service
from user_api.jobs.logs import progress_of
from user_api.jobs.schemas import JobCreate, JobRead, StatusApplied

router = APIRouter(tags=["jobs"])


class WaitTooLong(BadRequest):
    """The wait asked for is longer than this server allows."""


@router.get("/jobs")
def list_jobs(
    user: CurrentUser,
    session: SessionDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    status: Annotated[
        list[JobStatus] | None,
        Query(
            max_length=len(JobStatus),
            description="Only jobs in this status; repeat for several (status=queued&"
            "status=running).",
        ),
    ] = None,
) -> list[JobRead]:
    """Your jobs, newest first (the order is applied before ``offset`` and
    ``limit``). ``waiting`` is null here: ``GET /jobs/{id}`` says why a queued job
    waits."""
    return service.list_jobs(
        session, user=user, offset=offset, limit=limit, statuses=frozenset(status or ())
    )


@router.post("/jobs", status_code=201)
def create_job(
    payload: JobCreate,
    user: CurrentUserBeforeWrites,
    session: SessionDep,
    catalog: CatalogStoreDep,
    storage: StorageDep,
) -> JobRead:
    """Start a job of a catalog entrypoint on your files. 400 for unknown inputs or
    applications, 409 for a name already used or result folders that already hold
    files, 413/422 for a request over the limits."""
    # The caller is read apart from this request's transaction, so the inputs are
    # checked before the session writes anything (see service.create_job).
    return service.create_job(
        session, user=user, payload=payload, catalog=catalog.current, storage=storage
    )


@router.get("/jobs/{job_id}")
async def get_job(
    request: Request,
    job_id: IdPath,
    user: CurrentUserOutsideTransactions,
    settings: SettingsDep,
    worker_api: WorkerApiDep,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=3600,
            description=(
                "Seconds to wait for the job's status to change before answering "
                "(at most JOB_WAIT_MAX_SECONDS, 60 by default); 0 answers at once."
            ),
        ),
    ] = 0,
    status: Annotated[
        JobStatus | None,
        Query(
            description=(
                "With wait: the status you know; the answer comes at once if the job "
                "is no longer in it (default: its status when the request arrives)."
            )
        ),
    ] = None,
) -> JobRead:
    """One of your jobs; 404 when it is not yours or does not exist. With ``wait``,
    answers as soon as its status changes (or when the wait ends), so that a client
    follows a job without polling in a loop; a job that has ended answers at once.
    A queued job says why it is not running (``waiting``: no worker connected,
    hardware no connected worker has, ``older_than``, busy workers with its place
    in line, a re-queued attempt); null when the worker API does not answer in 2 s."""
    if wait > settings.job_wait_max_seconds:
        raise WaitTooLong(
            f"wait may be at most {settings.job_wait_max_seconds:g} seconds on this server"
        )
    job = await service.wait_for_job(
        request.app.state.session_factory,
        user=user,
        job_id=job_id,
        wait=wait,
        known=status,
        poll_seconds=settings.job_wait_poll_seconds,
        max_waiting=settings.job_wait_max_waiting,
    )
    return await service.with_waiting(worker_api, await progress_of(worker_api, job))


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: IdPath, user: CurrentUser, session: SessionDep) -> JobRead:
    """Cancel one of your active jobs (extension); 409 when it has already ended."""
    return service.cancel_job(session, user=user, job_id=job_id)


@router.delete("/jobs/{job_id}", status_code=204)
def delete_job(
    job_id: IdPath,
    user: CurrentUser,
    session: SessionDep,
    storage: StorageDep,
) -> Response:
    """Cancel the job if it is still active, then remove it and its output/, log/
    and artifact/ folders."""
    service.delete_job(session, user=user, job_id=job_id, storage=storage)
    return Response(status_code=204)


@router.put("/_job_status", dependencies=[InternalCaller], include_in_schema=False)
def update_job_status(update: StatusUpdate, session: SessionDep) -> StatusApplied:
    """A status change reported by the worker API."""
    return service.apply_status_update(session, update)
