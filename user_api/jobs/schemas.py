"""Job request and response bodies (contract section 1, JobCreate / Job)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from labcloud.contract import Environment, HardwareSpec, JobStatus

# Job names become folder names (output/<job_name>/), so they must be one safe segment.
_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+-]{0,127}$")


class ApplicationRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    application: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=128)
    entrypoint: str = Field(min_length=1, max_length=128)


class FilesDown(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config_id: str | None = None
    data_ids: list[str] | None = None
    artifact_ids: list[str] | None = None


class JobAttributes(BaseModel):
    model_config = ConfigDict(extra="forbid")

    files_down: FilesDown = Field(default_factory=FilesDown)
    env_vars: dict[str, Annotated[str, Field(max_length=65536)]] | None = None


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_name: str
    environment: Environment | None = None
    priority: int = Field(default=0, ge=0, le=5)
    application: ApplicationRef
    attributes: JobAttributes = Field(default_factory=JobAttributes)
    hardware: HardwareSpec | None = None

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
    paths_out: PathsOut


class StatusApplied(BaseModel):
    job_id: int
    status: JobStatus
    applied: bool
