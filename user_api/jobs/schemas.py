"""Job request and response bodies (contract section 1, JobCreate / Job)."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from labcloud.contract import Environment, HardwareSpec, JobStatus, Outcome

# Job names become folder names (output/<job_name>/), so they must be one safe segment.
_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+-]{0,127}$")

# Request limits (README "Request limits"). Each bounds what one submission can make
# the server do: the ids are looked up in storage, the expanded inputs and the
# environment are stored in the job and sent to a worker.
MAX_INPUT_IDS = 1000
"""Entries in each of ``data_ids`` and ``artifact_ids``."""
MAX_PATH_LENGTH = 1024
"""Characters of one input path (``config_id``, each id)."""
MAX_INPUT_FILES = 10_000
"""Files the inputs of one job may expand to (folders count their files)."""
MAX_ENV_VARS = 100
MAX_ENV_NAME_LENGTH = 128
MAX_ENV_VALUE_LENGTH = 65536
MAX_CPU_CORES = 1024
MAX_MEMORY_MIB = 16 * 1024 * 1024  # 16 TiB
MAX_GPUS = 64
MAX_GPU_MEM_MIB = 1024 * 1024  # 1 TiB per GPU
MAX_GPU_NAME_LENGTH = 128


def _no_nul(value: str) -> str:
    # A process environment is a list of NUL-terminated strings: a NUL cannot be
    # passed to the container, and the job would fail at its start, not here.
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


InputPath = Annotated[str, Field(max_length=MAX_PATH_LENGTH)]
EnvValue = Annotated[str, Field(max_length=MAX_ENV_VALUE_LENGTH), AfterValidator(_no_nul)]
EnvName = Annotated[str, Field(min_length=1, max_length=MAX_ENV_NAME_LENGTH)]


class ApplicationRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    application: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=128)
    entrypoint: str = Field(min_length=1, max_length=128)


class FilesDown(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config_id: InputPath | None = None
    data_ids: Annotated[list[InputPath], Field(max_length=MAX_INPUT_IDS)] | None = None
    artifact_ids: Annotated[list[InputPath], Field(max_length=MAX_INPUT_IDS)] | None = None


class JobAttributes(BaseModel):
    model_config = ConfigDict(extra="forbid")

    files_down: FilesDown = Field(default_factory=FilesDown)
    env_vars: Annotated[dict[EnvName, EnvValue], Field(max_length=MAX_ENV_VARS)] | None = None

    @field_validator("files_down", mode="before")
    @classmethod
    def _null_is_empty(cls, value: object) -> object:
        # Clients built for DECODE may send "files_down": null for "no inputs".
        return FilesDown() if value is None else value


class HardwareRequest(HardwareSpec):
    """``hardware`` of JobCreate: ``HardwareSpec`` with the bounds of a real
    machine. A job asking for more could never be placed and would wait forever."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu_cores: int | None = Field(default=None, ge=1, le=MAX_CPU_CORES)
    memory: int | None = Field(default=None, ge=1, le=MAX_MEMORY_MIB, description="MiB.")
    gpu_model: str | None = Field(default=None, max_length=MAX_GPU_NAME_LENGTH)
    gpu_archi: str | None = Field(default=None, max_length=MAX_GPU_NAME_LENGTH)
    gpu_mem: int | None = Field(default=None, ge=0, le=MAX_GPU_MEM_MIB, description="MiB.")
    gpus: int | None = Field(default=None, ge=0, le=MAX_GPUS)


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_name: str
    environment: Environment | None = None
    priority: int = Field(default=0, ge=0, le=5)
    application: ApplicationRef
    attributes: JobAttributes = Field(default_factory=JobAttributes)
    hardware: HardwareRequest | None = None

    @field_validator("priority", mode="before")
    @classmethod
    def _null_priority_is_zero(cls, value: object) -> object:
        # DECODE's API takes null as 0, and its job form sends null when the field
        # is left empty.
        return 0 if value is None else value

    @field_validator("attributes", mode="before")
    @classmethod
    def _null_attributes_are_empty(cls, value: object) -> object:
        return JobAttributes() if value is None else value

    @field_validator("job_name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not _JOB_NAME.match(value) or value.strip() != value:
            raise ValueError(
                "job_name must be 1-128 characters of letters, digits, space and ._+- "
                "starting with a letter or digit"
            )
        return value


class PathsOut(BaseModel):
    output: str
    log: str
    artifact: str


class WaitingReason(StrEnum):
    """Why a queued job is not running yet (``waiting.reason``)."""

    NO_WORKER = "no_worker"  # no worker connected for its environment
    NO_GPU = "no_gpu"  # no connected worker offers (enough) GPUs
    NO_MEMORY = "no_memory"
    NO_CPU = "no_cpu"
    GPU_MODEL = "gpu_model"
    GPU_ARCHI = "gpu_archi"
    GPU_MEMORY = "gpu_memory"
    BUSY = "busy"  # workers that could run it are busy: see position
    OLDER_THAN = "older_than"  # waits to become old enough for cloud workers
    REQUEUED = "requeued"  # re-queued after its worker was lost, nothing else blocks


class JobWaiting(BaseModel):
    """Extension: why a queued job waits, from what the worker API knows.
    ``position`` is the job's place in line (1 = next) among the queued jobs the
    workers that could run it would take; ``attempt``/``max_attempts`` are set for
    a job re-queued after its worker was lost (the attempt it waits to start)."""

    reason: WaitingReason
    message: str
    position: int | None = None
    attempt: int | None = None
    max_attempts: int | None = None


class JobProgress(BaseModel):
    """A running job's latest ``LABCLOUD_PROGRESS`` report (docs/tools.md)."""

    fraction: float | None = Field(default=None, ge=0, le=1)
    message: str | None = None
    updated_at: datetime


class JobRead(BaseModel):
    id: int
    job_name: str
    environment: Environment | None
    priority: int
    application: ApplicationRef
    attributes: JobAttributes
    hardware: HardwareSpec | None
    user_id: str
    user_email: str
    status: JobStatus
    date_created: datetime
    date_started: datetime | None
    date_finished: datetime | None
    runtime_details: str | None
    # Extension: how the job's last attempt ended (exit code, failure kind, attempt,
    # times, log tail); None while it is active and for jobs that ended without one.
    outcome: Outcome | None = None
    paths_out: PathsOut
    # Extension: why a queued job is not running (GET /jobs/{id} only; null in the
    # list, for other statuses, and when the worker API does not answer in time).
    waiting: JobWaiting | None = None
    # Extension: the tool's latest progress report (GET /jobs/{id}; null when it
    # reported none or the worker API does not answer in time).
    progress: JobProgress | None = None


class StatusApplied(BaseModel):
    job_id: int
    status: JobStatus
    applied: bool
