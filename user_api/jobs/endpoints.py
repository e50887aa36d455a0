"""Job routes (contract section 1) and the worker API's status callback."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from labcloud.contract import StatusUpdate
from user_api.dependencies import (
    CatalogStoreDep,
    CurrentUser,
    ForwarderDep,
    InternalCaller,
    SessionDep,
    StorageDep,
    after_commit,
)
from user_api.jobs import service
from user_api.jobs.schemas import JobCreate, JobRead, StatusApplied

router = APIRouter(tags=["jobs"])


@router.get("/jobs")
def list_jobs(
    user: CurrentUser,
    session: SessionDep,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[JobRead]:
    return service.list_jobs(session, user=user, offset=offset, limit=limit)


@router.post("/jobs", status_code=201)
def create_job(
    payload: JobCreate,
    user: CurrentUser,
    session: SessionDep,
    catalog: CatalogStoreDep,
    storage: StorageDep,
    forwarder: ForwarderDep,
) -> JobRead:
    job = service.create_job(
        session, user=user, payload=payload, catalog=catalog.current, storage=storage
    )
    after_commit(session, forwarder.wake)
    return job


@router.get("/jobs/{job_id}")
def get_job(job_id: int, user: CurrentUser, session: SessionDep) -> JobRead:
    return service.get_job(session, user=user, job_id=job_id)


@router.post("/jobs/{job_id}/cancel")
def cancel_job(
    job_id: int, user: CurrentUser, session: SessionDep, forwarder: ForwarderDep
) -> JobRead:
    job = service.cancel_job(session, user=user, job_id=job_id)
    after_commit(session, forwarder.wake)
    return job


@router.delete("/jobs/{job_id}", status_code=204)
def delete_job(
    job_id: int,
    user: CurrentUser,
    session: SessionDep,
    storage: StorageDep,
    forwarder: ForwarderDep,
) -> Response:
    service.delete_job(session, user=user, job_id=job_id, storage=storage)
    after_commit(session, forwarder.wake)
    return Response(status_code=204)


@router.put("/_job_status", dependencies=[InternalCaller], include_in_schema=False)
def update_job_status(update: StatusUpdate, session: SessionDep) -> StatusApplied:
    return service.apply_status_update(session, update)
