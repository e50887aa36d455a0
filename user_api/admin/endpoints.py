"""Admin routes (group ``admins``, under ``/admin/``) and the worker API's account
check (internal key). All routes are sync: they sum file sizes from storage."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from labcloud.contract import JobStatus
from labcloud.settings import AuthMode
from labcloud.web import MAX_OFFSET, IdPath
from user_api.admin import service, workers
from user_api.admin.schemas import (
    AccountState,
    AccountStatus,
    AdminJob,
    AdminUser,
    AdminWorker,
    AuditEntryRead,
    GroupsUpdate,
    LimitsUpdate,
    QueueOverview,
    UsageChange,
    WorkerCreate,
    WorkerCreated,
)
from user_api.catalog.store import CatalogStatus
from user_api.dependencies import (
    AccountPoolDep,
    CatalogStoreDep,
    CurrentAdmin,
    InternalCaller,
    SessionDep,
    SettingsDep,
    StorageDep,
    StorageUsageDep,
    WorkerApiDep,
)
from user_api.limits import default_limits

router = APIRouter(prefix="/admin", tags=["admin"])
internal_router = APIRouter(tags=["internal"], include_in_schema=False)

Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET)]
Limit = Annotated[int, Query(ge=1, le=500)]


@router.get("/users")
def list_users(
    _admin: CurrentAdmin,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    search: Annotated[str | None, Query(max_length=320)] = None,
    status: AccountStatus | None = None,
    offset: Offset = 0,
    limit: Limit = 50,
) -> list[AdminUser]:
    """Accounts whose email contains ``search``, in one ``status``, oldest first."""
    return service.list_users(
        session,
        storage,
        defaults=default_limits(settings),
        search=search,
        status=status,
        offset=offset,
        limit=limit,
    )


@router.post("/users/{email}/approve")
def approve_user(
    email: str,
    admin: CurrentAdmin,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    pool: AccountPoolDep,
) -> AdminUser:
    """Let an account that signed up itself use the service."""
    return service.approve_user(
        session, storage, actor=admin, email=email, defaults=default_limits(settings), pool=pool
    )


@router.post("/users/{email}/disable")
def disable_user(
    email: str,
    admin: CurrentAdmin,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    pool: AccountPoolDep,
) -> AdminUser:
    """Disable an account: its tokens stop working on both APIs."""
    return service.set_active(
        session,
        storage,
        actor=admin,
        email=email,
        active=False,
        defaults=default_limits(settings),
        pool=pool,
    )


@router.post("/users/{email}/enable")
def enable_user(
    email: str,
    admin: CurrentAdmin,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    pool: AccountPoolDep,
) -> AdminUser:
    """Enable a disabled account again."""
    return service.set_active(
        session,
        storage,
        actor=admin,
        email=email,
        active=True,
        defaults=default_limits(settings),
        pool=pool,
    )


@router.put("/users/{email}/groups")
def set_groups(
    email: str,
    payload: GroupsUpdate,
    admin: CurrentAdmin,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    pool: AccountPoolDep,
) -> AdminUser:
    """Replace an account's groups."""
    return service.set_groups(
        session,
        storage,
        actor=admin,
        email=email,
        groups=payload.groups,
        local_auth=settings.auth is AuthMode.LOCAL,
        defaults=default_limits(settings),
        pool=pool,
    )


@router.put("/users/{email}/limits")
def set_limits(
    email: str,
    payload: LimitsUpdate,
    admin: CurrentAdmin,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
) -> AdminUser:
    """Set an account's limits (``null``: the default from the settings)."""
    return service.set_limits(
        session,
        storage,
        actor=admin,
        email=email,
        update=payload,
        defaults=default_limits(settings),
    )


@router.post("/workers", status_code=201)
def create_worker(
    payload: WorkerCreate,
    admin: CurrentAdmin,
    session: SessionDep,
    settings: SettingsDep,
    pool: AccountPoolDep,
) -> WorkerCreated:
    """Create a worker account; the answer holds its password and runner settings,
    shown this once."""
    return service.create_worker(
        session,
        actor=admin,
        request=payload,
        settings=settings,
        local_auth=settings.auth is AuthMode.LOCAL,
        pool=pool,
    )


@router.get("/workers")
async def list_workers(_admin: CurrentAdmin, worker_api: WorkerApiDep) -> list[AdminWorker]:
    """The connected workers: environment, groups, when last seen, the capacity of
    their last pull and the largest since they connected, the jobs they hold. 503
    when the worker API does not answer."""
    return await workers.connected_workers(worker_api)


@router.get("/queue")
def queue(_admin: CurrentAdmin, session: SessionDep) -> QueueOverview:
    """Jobs by status, environment and application; the oldest waiting job."""
    return service.queue_overview(session)


@router.get("/jobs")
def list_jobs(
    _admin: CurrentAdmin,
    session: SessionDep,
    status: JobStatus | None = None,
    user: Annotated[str | None, Query(description="The owner's email.")] = None,
    offset: Offset = 0,
    limit: Limit = 100,
) -> list[AdminJob]:
    """Any user's jobs, newest first."""
    return service.list_jobs(session, status=status, user_email=user, offset=offset, limit=limit)


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: IdPath, admin: CurrentAdmin, session: SessionDep) -> AdminJob:
    """Cancel any user's job."""
    return service.cancel_job(session, actor=admin, job_id=job_id)


@router.get("/catalog")
def catalog_status(_admin: CurrentAdmin, catalog: CatalogStoreDep) -> CatalogStatus:
    """The catalog in use and the last error met reloading it."""
    return catalog.status


@router.get("/audit")
def audit_log(
    _admin: CurrentAdmin, session: SessionDep, offset: Offset = 0, limit: Limit = 100
) -> list[AuditEntryRead]:
    """What admins changed, newest first."""
    return service.list_audit(session, offset=offset, limit=limit)


# No request transaction: counting an account's bytes may walk its folder, and no
# transaction (nor SQLite's write lock) stays open meanwhile.
@internal_router.get("/_accounts/{subject}", dependencies=[InternalCaller])
def account_state(
    request: Request, subject: str, settings: SettingsDep, usage: StorageUsageDep
) -> AccountState:
    """Whether an account's tokens may still be used, its storage limit and what its
    files take (asked by the worker API)."""
    return service.account_state(
        request.app.state.session_factory,
        subject,
        local_auth=settings.auth is AuthMode.LOCAL,
        defaults=default_limits(settings),
        usage=usage,
    )


@internal_router.post("/_accounts/{subject}/usage", dependencies=[InternalCaller])
def record_usage(
    request: Request,
    subject: str,
    change: UsageChange,
    settings: SettingsDep,
    usage: StorageUsageDep,
) -> AccountState:
    """Count bytes the worker API wrote into the account's files (its results
    uploads), and answer the account's state after it."""
    return service.record_usage(
        request.app.state.session_factory,
        subject,
        change,
        local_auth=settings.auth is AuthMode.LOCAL,
        defaults=default_limits(settings),
        usage=usage,
    )
