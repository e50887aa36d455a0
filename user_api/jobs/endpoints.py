"""Job routes (contract section 1) and the worker API's status callback."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from labcloud.contract import JobStatus, StatusUpdate
from labcloud.web import MAX_OFFSET, IdPath
from user_api.dependencies import (
    CatalogStoreDep,
    CurrentUser,
    CurrentUserBeforeWrites,
    InternalCaller,
    SessionDep,
    StorageDep,
)
from user_api.jobs import service
from user_api.jobs.schemas import JobCreate, JobRead, StatusApplied

router = APIRouter(tags=["jobs"])


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
    ``limit``)."""
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
def get_job(job_id: IdPath, user: CurrentUser, session: SessionDep) -> JobRead:
    """One of your jobs; 404 when it is not yours or does not exist."""
    return service.get_job(session, user=user, job_id=job_id)


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
