"""What admins do, without HTTP.

Every function that changes something writes exactly one audit entry in the same
transaction as the change, so the log holds a change if and only if it happened;
a request that changes nothing (approving an approved account) writes none, and
reads never write. Audit entries are never updated or deleted.
"""

from __future__ import annotations

import logging
import secrets
import shlex
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from labcloud.auth.passwords import password_problem
from labcloud.contract import Environment, Group, JobStatus, Outcome
from labcloud.db import unit_of_work, utcnow
from labcloud.errors import BadRequest, Conflict, NotFound
from labcloud.storage.base import Storage
from labcloud.storage.quota import UsageLedger, remaining_bytes
from user_api.admin import repository
from user_api.admin.schemas import (
    AccountState,
    AccountStatus,
    ActiveCounts,
    AdminJob,
    AdminUser,
    AuditAction,
    AuditEntryRead,
    Limits,
    LimitsUpdate,
    OldestQueued,
    QueueOverview,
    UsageChange,
    WorkerCreate,
    WorkerCreated,
)
from user_api.auth import repository as accounts
from user_api.auth import service as auth_service
from user_api.auth.cognito import AccountPool
from user_api.auth.service import AuthenticatedUser
from user_api.jobs import service as jobs_service
from user_api.jobs.lifecycle import Cause
from user_api.limits import UsageLimits, bytes_stored, limits_of, owner_state
from user_api.models import Job, User
from user_api.settings import UserApiSettings

logger = logging.getLogger(__name__)

# Worker accounts are named <name>@ this domain: a real-looking domain that email
# validation accepts and that no person's address uses.
WORKER_EMAIL_DOMAIN = "workers.labcloud.example.org"
# Runner settings written for a new worker account besides URLs and credentials:
# the runner's own defaults, spelled out so the file shows what can be tuned.
_RUNNER_DEFAULTS = {"TIMEOUT_STATUS": "5", "TIMEOUT_JOB": "10", "WAIT": "5"}


class UserNotFound(NotFound):
    """No account with this email."""


class LastAdmin(Conflict):
    """This would leave no active account in group 'admins'."""


class ManagedByCognito(BadRequest):
    """With AUTH=cognito, accounts and groups are managed in the Cognito user pool."""


# -- accounts -------------------------------------------------------------------------


def account_status(user: User) -> AccountStatus:
    if not user.is_active:
        return AccountStatus.DISABLED
    return AccountStatus.ACTIVE if user.is_approved else AccountStatus.PENDING


def _admin_user(
    user: User, *, storage: Storage, defaults: UsageLimits, active_jobs: int
) -> AdminUser:
    in_force = limits_of(user, defaults)
    return AdminUser(
        email=user.email,
        subject=user.subject,
        groups=list(user.groups),
        status=account_status(user),
        is_active=user.is_active,
        is_approved=user.is_approved,
        own_limits=Limits(
            max_active_jobs=user.max_active_jobs, max_storage_bytes=user.max_storage_bytes
        ),
        limits=Limits(
            max_active_jobs=in_force.max_active_jobs,
            max_storage_bytes=in_force.max_storage_bytes,
        ),
        created_at=user.created_at,
        active_jobs=active_jobs,
        bytes_stored=bytes_stored(storage, user.subject),
    )


def _read_user(session: Session, storage: Storage, defaults: UsageLimits, user: User) -> AdminUser:
    counts = repository.active_job_counts(session, [user.id])
    return _admin_user(user, storage=storage, defaults=defaults, active_jobs=counts.get(user.id, 0))


def _user(session: Session, email: str, pool: AccountPool | None = None) -> User:
    """The account with ``email``; with a Cognito pool, one LabCloud has not seen yet
    is recorded from the pool (so that an admin can disable a worker that never
    called the user API, and the worker API then refuses it)."""
    user = accounts.get_by_email(session, email.strip())
    if user is None and pool is not None:
        found = pool.find(email)
        if found is not None:
            user = accounts.add(session, found)
    if user is None:
        raise UserNotFound(f"no account with email {email!r}")
    return user


def _audit(
    session: Session,
    actor: AuthenticatedUser,
    action: AuditAction,
    target: str | None,
    details: dict[str, Any] | None = None,
) -> None:
    repository.add_audit_entry(
        session, actor=actor.email, action=action.value, target=target, details=details or {}
    )
    logger.info("admin %s: %s %s %s", actor.email, action.value, target or "", details or "")


def _keep_an_admin(session: Session, user: User) -> None:
    """Refuse a change that takes admin rights from ``user`` when no other active
    admin would be left."""
    if Group.ADMINS.value not in user.groups or not user.is_active:
        return
    if all(admin.id == user.id for admin in repository.lock_admins(session)):
        raise LastAdmin(
            f"{user.email} is the last active admin: make another account an admin first"
        )


def list_users(
    session: Session,
    storage: Storage,
    *,
    defaults: UsageLimits,
    search: str | None,
    status: AccountStatus | None,
    offset: int,
    limit: int,
) -> list[AdminUser]:
    """Accounts with their state, limits and current use. Bytes stored are summed
    from storage, so a page of many accounts with many files takes a while."""
    users = repository.list_users(session, search=search, status=status, offset=offset, limit=limit)
    counts = repository.active_job_counts(session, [user.id for user in users])
    return [
        _admin_user(user, storage=storage, defaults=defaults, active_jobs=counts.get(user.id, 0))
        for user in users
    ]


def approve_user(
    session: Session,
    storage: Storage,
    *,
    actor: AuthenticatedUser,
    email: str,
    defaults: UsageLimits,
    pool: AccountPool | None = None,
) -> AdminUser:
    """Let a self-signed-up account use the service. In a Cognito pool, this adds
    the account to ``users`` (confirming it if needed): its next token may act."""
    user = _user(session, email, pool)
    if not user.is_approved:
        if pool is not None:
            pool.approve(user.email)
            user.groups = sorted({*user.groups, Group.USERS.value})
        user.is_approved = True
        _audit(session, actor, AuditAction.APPROVE_USER, user.email)
    return _read_user(session, storage, defaults, user)


def set_active(
    session: Session,
    storage: Storage,
    *,
    actor: AuthenticatedUser,
    email: str,
    active: bool,
    defaults: UsageLimits,
    pool: AccountPool | None = None,
) -> AdminUser:
    """Disable an account (its tokens stop working at once, on both APIs; in a
    Cognito pool it cannot log in either) or enable it again. The last active admin
    cannot be disabled."""
    user = _user(session, email, pool)
    if user.is_active != active:
        if not active:
            _keep_an_admin(session, user)
        if pool is not None:
            pool.set_active(user.email, active)
        user.is_active = active
        action = AuditAction.ENABLE_USER if active else AuditAction.DISABLE_USER
        _audit(session, actor, action, user.email)
    return _read_user(session, storage, defaults, user)


def set_groups(
    session: Session,
    storage: Storage,
    *,
    actor: AuthenticatedUser,
    email: str,
    groups: list[Group],
    local_auth: bool,
    defaults: UsageLimits,
    pool: AccountPool | None = None,
) -> AdminUser:
    """Replace an account's groups. Refused when it would remove the last active
    admin. With Cognito the groups change in the pool, and the account's tokens
    carry them from its next login (or refresh) on."""
    if not local_auth and pool is None:
        raise ManagedByCognito(
            "with AUTH=cognito, groups come from the Cognito user pool: change them there"
        )
    user = _user(session, email, pool)
    after = sorted({group.value for group in groups})
    before = list(user.groups)
    if after != before or pool is not None:
        if Group.ADMINS.value not in after:
            _keep_an_admin(session, user)
        if pool is not None:
            pool.set_groups(user.email, after)
    if after != before:
        user.groups = after
        _audit(session, actor, AuditAction.SET_GROUPS, user.email, {"from": before, "to": after})
    return _read_user(session, storage, defaults, user)


def set_limits(
    session: Session,
    storage: Storage,
    *,
    actor: AuthenticatedUser,
    email: str,
    update: LimitsUpdate,
    defaults: UsageLimits,
) -> AdminUser:
    """Set an account's own limits; fields not sent stay, ``None`` means the default.
    A limit below the current use refuses new jobs or uploads, and takes nothing
    away."""
    user = _user(session, email)
    before = {"max_active_jobs": user.max_active_jobs, "max_storage_bytes": user.max_storage_bytes}
    changes = update.model_dump(include=update.model_fields_set)
    after = {**before, **changes}
    if after != before:
        user.max_active_jobs = after["max_active_jobs"]
        user.max_storage_bytes = after["max_storage_bytes"]
        _audit(session, actor, AuditAction.SET_LIMITS, user.email, {"from": before, "to": after})
    return _read_user(session, storage, defaults, user)


def account_state(
    session_factory: sessionmaker[Session],
    subject: str,
    *,
    local_auth: bool,
    defaults: UsageLimits,
    usage: UsageLedger,
) -> AccountState:
    """Whether tokens (and signed URLs) of the account ``subject`` may be used, its
    storage limit, which the worker API holds jobs' results to, and the bytes its
    files take by ``usage`` (which may recount them from storage: the account is
    read in a short transaction of its own, so none is open meanwhile). An unknown
    account is refused with local auth (it was deleted); with Cognito it is one the
    user API has not seen yet, and Cognito itself vouches for it."""
    with unit_of_work(session_factory) as session:
        state = owner_state(session, subject, defaults, local_auth=local_auth)
    limit = state.max_storage_bytes
    if not state.active or limit is None:
        # Nothing will be stored for a disabled account, nor held to a limit without one.
        return AccountState(active=state.active, max_storage_bytes=limit)
    used = usage.used(subject)
    return AccountState(
        active=True,
        max_storage_bytes=limit,
        bytes_used=used,
        remaining_storage_bytes=remaining_bytes(limit, used),
    )


def record_usage(
    session_factory: sessionmaker[Session],
    subject: str,
    change: UsageChange,
    *,
    local_auth: bool,
    defaults: UsageLimits,
    usage: UsageLedger,
) -> AccountState:
    """Count what the worker API wrote into ``subject``'s files (one atomic update
    of the count), and answer the account's state after it."""
    usage.adjust(subject, change.bytes)
    return account_state(
        session_factory, subject, local_auth=local_auth, defaults=defaults, usage=usage
    )


# -- worker accounts ------------------------------------------------------------------


def _generate_password() -> str:
    """32 random characters with a digit, both cases and a symbol (``-`` or ``_``),
    so that any Cognito password policy takes it too."""
    classes = (str.isdigit, str.islower, str.isupper, lambda c: c in "-_")
    while True:
        candidate = secrets.token_urlsafe(24)
        if password_problem(candidate) is None and all(
            any(test(char) for char in candidate) for test in classes
        ):
            return candidate


def create_worker(
    session: Session,
    *,
    actor: AuthenticatedUser,
    request: WorkerCreate,
    settings: UserApiSettings,
    local_auth: bool,
    pool: AccountPool | None = None,
) -> WorkerCreated:
    """Create a ``workers`` account (also ``cloud`` when asked) with a generated
    password, and the settings of a runner that uses it. The password is returned
    here only: the audit entry and the logs never see it. With Cognito the account
    is created in the pool (confirmed, the password permanent, in its groups) and
    recorded here; the runner finds the pool from ``/access_info``."""
    if not local_auth and pool is None:
        raise ManagedByCognito(
            "with AUTH=cognito, create worker accounts in the Cognito user pool "
            "(group 'workers') and give the runner its username and password"
        )
    groups = [Group.WORKERS, Group.CLOUD] if request.cloud else [Group.WORKERS]
    password = _generate_password()
    email = f"{request.name}@{WORKER_EMAIL_DOMAIN}"
    if pool is None:
        user = auth_service.create_account(
            session,
            email=email,
            password=password,
            groups=groups,
            creator=actor,
            self_signup_allowed=False,
        )
    else:
        if accounts.get_by_email(session, email) is not None:
            raise auth_service.AccountExists()
        user = pool.create(email, password, [group.value for group in groups])
        accounts.add(session, user)
    _audit(session, actor, AuditAction.CREATE_WORKER, user.email, {"groups": list(user.groups)})
    values = {
        "API_URL": settings.workerfacing_api_url.rstrip("/"),
        "AUTH_URL": settings.public_url.rstrip("/"),
        "USERNAME": user.email,
        "PASSWORD": password,
        **_RUNNER_DEFAULTS,
    }
    env_file = (
        f"# LabCloud worker runner {user.email} (groups: {', '.join(user.groups)})\n"
        "# Start it with: labcloud runner --env-file THIS_FILE\n"
        "# Keep this file private: it holds the account's password, shown only once.\n"
        "# PATH_BASE=/srv/labcloud/jobs   # job folders on the runner host\n"
        + "".join(f"{key}={shlex.quote(value)}\n" for key, value in values.items())
    )
    return WorkerCreated(
        email=user.email, groups=list(user.groups), settings=values, env_file=env_file
    )


# -- jobs -----------------------------------------------------------------------------


def _application(application: dict[str, Any]) -> str:
    """``application/version/entrypoint`` of a job's application reference."""
    parts = (application.get(key) for key in ("application", "version", "entrypoint"))
    return "/".join(str(part) for part in parts)


def _admin_job(job: Job, owner: str) -> AdminJob:
    return AdminJob(
        id=job.id,
        job_name=job.job_name,
        owner=owner,
        status=JobStatus(job.status),
        application=_application(job.application),
        environment=Environment(job.environment) if job.environment else None,
        priority=job.priority,
        date_created=job.date_created,
        date_started=job.date_started,
        date_finished=job.date_finished,
        runtime_details=job.runtime_details,
        outcome=Outcome.model_validate(job.outcome) if job.outcome else None,
    )


def queue_overview(session: Session) -> QueueOverview:
    """Counts of jobs by status, and of active jobs by environment and by
    application; the job waiting longest for a worker."""
    counts = repository.job_counts_by_status(session)
    by_environment: dict[str, ActiveCounts] = {}
    by_application: dict[str, ActiveCounts] = {}
    for environment, application, status in repository.active_jobs_summary(session):
        app_key = _application(application or {})
        for table, key in ((by_environment, environment or "any"), (by_application, app_key)):
            row = table.setdefault(key, ActiveCounts())
            if status == JobStatus.QUEUED.value:
                row.queued += 1
            else:
                row.running += 1
    oldest: OldestQueued | None = None
    found = repository.oldest_queued(session)
    if found is not None:
        job, owner = found
        oldest = OldestQueued(
            id=job.id,
            owner=owner,
            job_name=job.job_name,
            date_created=job.date_created,
            age_seconds=round((utcnow() - job.date_created).total_seconds(), 3),
        )
    return QueueOverview(
        by_status={status: counts.get(status.value, 0) for status in JobStatus},
        by_environment=dict(sorted(by_environment.items())),
        by_application=dict(sorted(by_application.items())),
        oldest_queued=oldest,
    )


def list_jobs(
    session: Session,
    *,
    status: JobStatus | None,
    user_email: str | None,
    offset: int,
    limit: int,
) -> list[AdminJob]:
    """Any user's jobs, newest first."""
    user_id = _user(session, user_email).id if user_email else None
    rows = repository.list_jobs(session, status=status, user_id=user_id, offset=offset, limit=limit)
    return [_admin_job(job, owner) for job, owner in rows]


def cancel_job(session: Session, *, actor: AuthenticatedUser, job_id: int) -> AdminJob:
    """Cancel any user's job; ``JobAlreadyEnded`` (409) for one that already ended.
    The audit entry is written in the transaction of the cancellation."""
    job = jobs_service.get_any_job(session, job_id=job_id)
    before = job.status
    jobs_service.cancel(session, job, cause=Cause.ADMIN_CANCEL)
    owner = repository.owner_email(session, job)
    _audit(
        session,
        actor,
        AuditAction.CANCEL_JOB,
        f"job {job.id}",
        {"owner": owner, "job_name": job.job_name, "status_before": before},
    )
    return _admin_job(job, owner)


# -- audit log ------------------------------------------------------------------------


def list_audit(session: Session, *, offset: int, limit: int) -> list[AuditEntryRead]:
    """Audit entries, newest first."""
    return [
        AuditEntryRead(
            id=entry.id,
            at=entry.at,
            actor=entry.actor,
            action=entry.action,
            target=entry.target,
            details=dict(entry.details),
        )
        for entry in repository.list_audit_entries(session, offset=offset, limit=limit)
    ]
