"""Job creation, second step: a resolved job draft is stored and enqueued.

A *resolver* turns a request into a ``JobDraft``: everything a worker needs to run
the job, in neutral terms (image, command, environment, inputs as storage keys,
hardware, limits), and what the job's row keeps of the request. The catalog
resolver (``user_api.jobs.resolvers.catalog``) is the one in use; another way of
creating jobs (a TES task, inline inputs) is another resolver producing the same
draft. ``submit`` is the same for all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from labcloud.contract import (
    AppSpec,
    ContainerSpec,
    Environment,
    HandlerSpec,
    HardwareSpec,
    JobSpecs,
    JobStatus,
    MetaSpec,
    OutputKind,
    PathsUpload,
    QueueJob,
)
from labcloud.db import utcnow
from labcloud.errors import Conflict
from user_api.auth.service import AuthenticatedUser
from user_api.jobs import repository
from user_api.limits import reserve_active_job
from user_api.models import Job, OutboxKind

logger = logging.getLogger(__name__)


class DuplicateJobName(Conflict):
    """You already have a job with this name."""


@dataclass(frozen=True, slots=True)
class Image:
    """The container image a job runs in."""

    url: str
    name: str | None = None
    version: str | None = None


@dataclass(frozen=True, slots=True)
class JobRecord:
    """What the job's row keeps of the request, as JSON: shown back by ``GET
    /jobs`` (DECODE's fields) and, for the snapshot, what the job was started with."""

    application: dict[str, Any]
    attributes: dict[str, Any]
    # The hardware as the user asked for it ({} when they did not).
    hardware: dict[str, Any]
    entrypoint_snapshot: dict[str, Any]


@dataclass(frozen=True, slots=True)
class JobDraft:
    """A job ready to be stored and enqueued: checked, expanded, independent of
    where the request came from."""

    job_name: str
    image: Image
    command: Sequence[str]
    # "<mount path>" (relative to the job's /files) -> storage key, one per file.
    inputs: Mapping[str, str]
    # Result kind -> the folder under /files whose files are uploaded after the run.
    outputs: Mapping[OutputKind, str]
    record: JobRecord
    env: Mapping[str, str] = field(default_factory=dict)
    # What a worker must offer to take the job.
    hardware: HardwareSpec = field(default_factory=HardwareSpec)
    # Seconds after which the run is stopped; None for no limit.
    timeout: int | None = None
    container: ContainerSpec = field(default_factory=ContainerSpec)
    environment: Environment | None = None
    priority: int = 0
    # The name the image knows the command by (the catalog's entrypoint name).
    entrypoint: str | None = None


def result_folders(job_name: str) -> dict[str, str]:
    """Where a job's results go in its owner's storage (removed with the job):
    ``output/<job_name>``, ``log/<job_name>``, ``artifact/<job_name>``."""
    return {kind.value: f"{kind.value}/{job_name}" for kind in OutputKind}


def submit(session: Session, user: AuthenticatedUser, draft: JobDraft) -> Job:
    """Store ``draft`` as ``user``'s ``queued`` job and write its enqueue message to
    the worker outbox, in the caller's transaction (its commit wakes the relay).
    Refused with ``ActiveJobLimitReached`` when the user's active jobs are at their
    limit, ``DuplicateJobName`` when the name is taken.

    This is where the write transaction starts: resolvers do their slow work (storage
    look-ups) before, so that on SQLite the database's write lock is held only for
    these few statements."""
    reserve_active_job(session, user.id, user.limits.max_active_jobs)
    paths = result_folders(draft.job_name)
    record = draft.record
    job = Job(
        user_id=user.id,
        job_name=draft.job_name,
        environment=draft.environment.value if draft.environment else None,
        priority=draft.priority,
        application=record.application,
        attributes=record.attributes,
        hardware=record.hardware,
        entrypoint_snapshot=record.entrypoint_snapshot,
        paths_out=paths,
        status=JobStatus.QUEUED.value,
        date_created=utcnow(),
    )
    # The unique (user, name) constraint is the check: no SELECT before, and no
    # savepoint, since a refused job leaves nothing in the transaction worth keeping.
    try:
        job.id = repository.insert_job(session, job)
    except IntegrityError as exc:
        raise DuplicateJobName(f"you already have a job named {draft.job_name!r}") from exc
    queue_job = QueueJob(
        job=JobSpecs(
            app=AppSpec(cmd=list(draft.command), env=dict(draft.env)),
            handler=HandlerSpec(
                image_url=draft.image.url,
                image_name=draft.image.name,
                image_version=draft.image.version,
                entrypoint=draft.entrypoint,
                files_down=dict(draft.inputs),
                files_up=dict(draft.outputs),
            ),
            meta=MetaSpec(job_id=job.id, date_created=job.date_created),
            hardware=draft.hardware,
            timeout=draft.timeout,
            container=draft.container,
        ),
        environment=draft.environment,
        priority=draft.priority,
        paths_upload=PathsUpload(
            **{kind: f"{user.subject}/{path}" for kind, path in paths.items()}
        ),
    )
    repository.add_outbox(session, job.id, OutboxKind.ENQUEUE, queue_job.model_dump(mode="json"))
    return job
