"""Request and response bodies of the admin routes."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from labcloud.contract import AccountStatus as AccountStatus  # re-exported for this domain
from labcloud.contract import Environment, Group, JobStatus, Outcome


class AuditAction(StrEnum):
    """The changes recorded in the audit log."""

    APPROVE_USER = "approve_user"
    DISABLE_USER = "disable_user"
    ENABLE_USER = "enable_user"
    SET_GROUPS = "set_groups"
    SET_LIMITS = "set_limits"
    CREATE_WORKER = "create_worker"
    CANCEL_JOB = "cancel_job"


class Limits(BaseModel):
    max_active_jobs: int | None = Field(description="Queued or running jobs at once.")
    max_storage_bytes: int | None = Field(description="Total size of the account's files.")


class AdminUser(BaseModel):
    email: str
    subject: str
    groups: list[str]
    status: AccountStatus
    is_active: bool
    is_approved: bool
    own_limits: Limits = Field(description="The account's own limits; null: the default.")
    limits: Limits = Field(description="The limits in force; null: unlimited.")
    created_at: datetime
    active_jobs: int
    bytes_stored: int


class GroupsUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    groups: list[Group] = Field(min_length=1)


class LimitsUpdate(BaseModel):
    """New limits; a field left out stays as it is, ``null`` returns to the default."""

    model_config = ConfigDict(extra="forbid")

    max_active_jobs: int | None = Field(default=None, ge=0)
    max_storage_bytes: int | None = Field(default=None, ge=0)


class WorkerCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$",
        description="The worker's name (letters, digits, '_' and '-'), e.g. gpu-box-1.",
    )
    cloud: bool = Field(default=False, description="Also in group 'cloud': pulls cloud jobs.")


class WorkerCreated(BaseModel):
    """A new worker account and the settings of a runner using it. The password is
    in here and nowhere else: it is not stored in readable form."""

    email: str
    groups: list[str]
    settings: dict[str, str]
    env_file: str


class ActiveCounts(BaseModel):
    queued: int = 0
    running: int = Field(default=0, description="Held by a worker (pulled ... postprocessing).")


class OldestQueued(BaseModel):
    id: int
    owner: str
    job_name: str
    date_created: datetime
    age_seconds: float


class QueueOverview(BaseModel):
    by_status: dict[JobStatus, int] = Field(description="All jobs, by status.")
    by_environment: dict[str, ActiveCounts] = Field(
        description="Active jobs by requested environment ('any' when none was asked for)."
    )
    by_application: dict[str, ActiveCounts] = Field(
        description="Active jobs by application/version/entrypoint."
    )
    oldest_queued: OldestQueued | None


class AdminJob(BaseModel):
    id: int
    job_name: str
    owner: str
    status: JobStatus
    application: str
    environment: Environment | None
    priority: int
    date_created: datetime
    date_started: datetime | None
    date_finished: datetime | None
    runtime_details: str | None
    # How the attempt ended and where it ran (runner, backend, run id).
    outcome: Outcome | None = None


class AuditEntryRead(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    target: str | None
    details: dict[str, Any]


class AccountState(BaseModel):
    """For the worker API: may this account's tokens still be used, how many bytes
    may its files take (null: no limit), how many they take as counted by the user
    API and how many more may be stored (both null when there is no limit)?"""

    active: bool
    max_storage_bytes: int | None = None
    bytes_used: int | None = None
    remaining_storage_bytes: int | None = None


# Larger than any file system holds, small enough for every database's BIGINT.
_MAX_USAGE_CHANGE = 2**62


class UsageChange(BaseModel):
    """Bytes the worker API's own routes added to an account's files (negative:
    removed), counted by the user API at once."""

    model_config = ConfigDict(extra="forbid")

    bytes: int = Field(ge=-_MAX_USAGE_CHANGE, le=_MAX_USAGE_CHANGE)


class WorkerCapacity(BaseModel):
    """What a worker offers (memory and GPU memory in MiB)."""

    memory: int
    cpu_cores: int
    gpus: int
    gpu_mem: int
    gpu_model: str | None
    gpu_archi: str | None


class WorkerJob(BaseModel):
    id: int
    status: JobStatus


class AdminWorker(BaseModel):
    """A connected worker (seen within the worker API's WORKER_SEEN_WINDOW_SECONDS)."""

    name: str
    environment: Environment
    groups: list[str]
    connected_at: datetime = Field(description="Since when it has been connected.")
    last_pull_at: datetime
    last_seen_at: datetime = Field(description="Its last pull or keep-alive.")
    older_than: float = Field(
        description="Age in seconds at which it takes jobs for any environment."
    )
    offered: WorkerCapacity = Field(description="Free capacity offered in its last pull.")
    peak: WorkerCapacity = Field(description="The largest offer since it connected.")
    jobs: list[WorkerJob] = Field(description="The jobs it holds now.")
