"""Jobs: creation against the catalog, listing, deletion, cancellation, and the
status updates that come back from the worker API."""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Collection, Sequence

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from labcloud.contract import (
    AppSpec,
    Environment,
    FileArea,
    HandlerSpec,
    HardwareSpec,
    JobSpecs,
    JobStatus,
    MetaSpec,
    OutputKind,
    PathsUpload,
    QueueJob,
    StatusUpdate,
)
from labcloud.db import utcnow
from labcloud.errors import BadRequest, Conflict, NotFound, PayloadTooLarge
from labcloud.storage.base import EntryType, Storage
from labcloud.storage.paths import user_key
from user_api.auth.service import AuthenticatedUser
from user_api.catalog.schemas import Catalog, CatalogEntrypoint
from user_api.jobs import repository
from user_api.jobs.schemas import (
    MAX_INPUT_FILES,
    ApplicationRef,
    FilesDown,
    JobAttributes,
    JobCreate,
    JobRead,
    PathsOut,
    StatusApplied,
)
from user_api.limits import reserve_active_job
from user_api.models import Job, OutboxKind
from user_api.notifications.service import enqueue_completion_email

logger = logging.getLogger(__name__)

# JobCreate's input fields, the area each one names paths in, and the key of the
# entrypoint's ``handler.files_down`` that says where they are mounted.
_INPUTS: tuple[tuple[str, FileArea], ...] = (
    ("config_id", FileArea.CONFIG),
    ("data_ids", FileArea.DATA),
    ("artifact_ids", FileArea.ARTIFACT),
)


class JobNotFound(NotFound):
    """Job not found."""


class DuplicateJobName(Conflict):
    """You already have a job with this name."""


class InputMissing(BadRequest):
    """Some input files do not exist."""


class InputClash(BadRequest):
    """Two inputs would be placed at the same path."""


class EnvNotAllowed(BadRequest):
    """The entrypoint does not accept these environment variables."""


class TooManyInputFiles(PayloadTooLarge):
    """The inputs of this job expand to too many files."""


class ResultFoldersInUse(Conflict):
    """The folders this job's results would go to already hold files."""


class JobAlreadyEnded(Conflict):
    """The job has already ended."""


def create_job(
    session: Session,
    *,
    user: AuthenticatedUser,
    payload: JobCreate,
    catalog: Catalog,
    storage: Storage,
) -> JobRead:
    """Validate a job against the catalog and the user's files, store it as
    ``queued`` and write the enqueue message to the outbox (same transaction).
    Refused with ``ActiveJobLimitReached`` when the user's active jobs are at their
    limit.

    Everything slow (the catalog, storage look-ups, expanding folders) comes before
    the first statement: the session takes its connection, and on SQLite the
    database's write lock, only then, so a large submission does not hold up other
    users' writes while it is checked."""
    ref = payload.application
    entrypoint = catalog.get_entrypoint(ref.application, ref.version, ref.entrypoint)
    env = payload.attributes.env_vars or {}
    rejected = sorted(set(env) - entrypoint.allowed_env)
    if rejected:
        allowed = ", ".join(sorted(entrypoint.allowed_env)) or "none"
        raise EnvNotAllowed(
            f"environment variables not accepted by {ref.application}/{ref.version}/"
            f"{ref.entrypoint}: {', '.join(rejected)} (allowed: {allowed})"
        )
    files_down = _place_inputs(storage, user.subject, payload.attributes.files_down, entrypoint)
    hardware = _merge_hardware(payload.hardware, entrypoint)
    paths = {kind.value: f"{kind.value}/{payload.job_name}" for kind in OutputKind}
    _check_result_folders_empty(storage, user.subject, paths)

    # The write transaction starts here.
    reserve_active_job(session, user.id, user.limits.max_active_jobs)
    job = Job(
        user_id=user.id,
        job_name=payload.job_name,
        environment=payload.environment.value if payload.environment else None,
        priority=payload.priority,
        application=ref.model_dump(mode="json"),
        attributes=payload.attributes.model_dump(mode="json"),
        hardware=payload.hardware.model_dump(mode="json") if payload.hardware else {},
        entrypoint_snapshot=entrypoint.model_dump(mode="json"),
        paths_out=paths,
        status=JobStatus.QUEUED.value,
        date_created=utcnow(),
    )
    # The unique (user, name) constraint is the check: no SELECT before, and no
    # savepoint, since a refused job leaves nothing in the transaction worth keeping.
    try:
        job.id = repository.insert_job(session, job)
    except IntegrityError as exc:
        raise DuplicateJobName(f"you already have a job named {payload.job_name!r}") from exc

    queue_job = QueueJob(
        job=JobSpecs(
            app=AppSpec(cmd=list(entrypoint.app.cmd), env=env),
            handler=HandlerSpec(
                image_url=entrypoint.handler.image_url,
                image_name=entrypoint.handler.image_name,
                image_version=entrypoint.handler.image_version,
                entrypoint=ref.entrypoint,
                files_down=files_down,
                files_up=dict(entrypoint.handler.files_up),
            ),
            meta=MetaSpec(job_id=job.id, date_created=job.date_created),
            hardware=hardware,
            timeout=entrypoint.timeout,
            container=entrypoint.container.spec(),
        ),
        environment=payload.environment,
        priority=payload.priority,
        paths_upload=PathsUpload(
            **{kind: f"{user.subject}/{path}" for kind, path in paths.items()}
        ),
    )
    repository.add_outbox(session, job.id, OutboxKind.ENQUEUE, queue_job.model_dump(mode="json"))
    logger.info(
        "job %s created by %s: %s/%s/%s, %d input files",
        job.id,
        user.email,
        ref.application,
        ref.version,
        ref.entrypoint,
        len(files_down),
    )
    return _read(job, user)


def _check_result_folders_empty(storage: Storage, subject: str, paths: dict[str, str]) -> None:
    """Refuse a job whose result folders already hold something: deleting the job
    removes those folders, and must not take the user's own files with them (a
    model uploaded to ``artifact/<name>/``, the results of an earlier job of that
    name kept after it was deleted from another client)."""
    taken = [f"{path}/" for path in paths.values() if storage.stat(f"{subject}/{path}") is not None]
    if taken:
        raise ResultFoldersInUse(
            f"{', '.join(taken)} already exist: a job's results go to output/<job_name>/, "
            "log/<job_name>/ and artifact/<job_name>/, which are removed with the job. "
            "Choose another job name, or move or delete those files first."
        )


def list_jobs(
    session: Session,
    *,
    user: AuthenticatedUser,
    offset: int,
    limit: int,
    statuses: Collection[JobStatus] = (),
) -> list[JobRead]:
    """The user's jobs, newest first; only those in ``statuses`` when it is given."""
    jobs: Sequence[Job] = repository.list_for_user(
        session, user.id, offset=offset, limit=limit, statuses=statuses
    )
    return [_read(job, user) for job in jobs]


def get_job(session: Session, *, user: AuthenticatedUser, job_id: int) -> JobRead:
    return _read(_owned(session, user, job_id), user)


def cancel_job(session: Session, *, user: AuthenticatedUser, job_id: int) -> JobRead:
    """Move an active job to ``canceled`` and tell the worker API; ``JobAlreadyEnded``
    (409) for a job that had already ended."""
    job = _owned(session, user, job_id)
    if not _cancel(session, job, discard_outputs=False, reason="canceled by the user"):
        raise _already_ended(session, job)
    session.refresh(job)
    return _read(job, user)


def cancel_any_job(session: Session, *, job_id: int) -> Job:
    """Cancel any user's job (for admins): ``cancel_job`` without the ownership
    check. Returns the job as it is afterwards."""
    job = repository.get(session, job_id)
    if job is None:
        raise JobNotFound(f"job {job_id} not found")
    if not _cancel(session, job, discard_outputs=False, reason="canceled by an administrator"):
        raise _already_ended(session, job)
    session.refresh(job)
    return job


def _already_ended(session: Session, job: Job) -> JobAlreadyEnded:
    # Read again: the guarded update may have lost to a status that arrived since
    # the job was loaded.
    session.refresh(job)
    return JobAlreadyEnded(
        f"job {job.id} has already ended (status {job.status}): nothing to cancel"
    )


def delete_job(session: Session, *, user: AuthenticatedUser, job_id: int, storage: Storage) -> None:
    """Cancel the job if it is active, then remove its row and its result folders."""
    job = _owned(session, user, job_id)
    _cancel(session, job, discard_outputs=True, reason="deleted by the user")
    repository.delete_job(session, job.id)
    session.flush()
    # Files go last: if removing them fails, the transaction rolls back and the job
    # is still listed, so nothing is half-deleted from the user's point of view.
    for kind in OutputKind:
        storage.delete(f"{user.subject}/{kind.value}/{job.job_name}")
    logger.info("job %s deleted by %s", job.id, user.email)


def apply_status_update(session: Session, update: StatusUpdate) -> StatusApplied:
    """A status reported by the worker API. Illegal or repeated transitions are
    no-ops (the worker API may deliver a message twice); an unknown job is 404, which
    the worker API takes as "nothing to update"."""
    job = repository.get(session, update.job_id)
    if job is None:
        raise JobNotFound(f"job {update.job_id} not found")
    applied = repository.transition(session, job.id, update.status, update.runtime_details)
    if applied:
        logger.info("job %s is now %s", job.id, update.status.value)
        if update.status.is_terminal:
            enqueue_completion_email(session, job)
    else:
        logger.info(
            "job %s: ignored %s (current status %s)", job.id, update.status.value, job.status
        )
    return StatusApplied(job_id=job.id, status=update.status, applied=applied)


def _cancel(session: Session, job: Job, *, discard_outputs: bool, reason: str) -> bool:
    """Cancel ``job`` if it is active; False when it had already ended.
    ``discard_outputs``: the job is being deleted, so its worker must not upload
    even the partial logs a canceled job keeps."""
    if not repository.transition(session, job.id, JobStatus.CANCELED, reason):
        return False
    # If the worker API never received the job, withdrawing the message is enough.
    if not repository.drop_pending_enqueue(session, job.id):
        repository.add_outbox(
            session, job.id, OutboxKind.CANCEL, {"discard_outputs": discard_outputs}
        )
    if not discard_outputs:  # a job being deleted has no page left to announce
        enqueue_completion_email(session, job)
    logger.info("job %s %s", job.id, reason)
    return True


def _owned(session: Session, user: AuthenticatedUser, job_id: int) -> Job:
    job = repository.get_for_user(session, job_id, user.id)
    if job is None:  # another user's job is "not found" too: no existence oracle
        raise JobNotFound(f"job {job_id} not found")
    return job


def _read(job: Job, user: AuthenticatedUser) -> JobRead:
    return JobRead(
        id=job.id,
        job_name=job.job_name,
        environment=Environment(job.environment) if job.environment else None,
        priority=job.priority,
        application=ApplicationRef.model_validate(job.application),
        attributes=JobAttributes.model_validate(job.attributes),
        hardware=HardwareSpec.model_validate(job.hardware) if job.hardware else None,
        user_id=user.subject,
        user_email=user.email,
        status=JobStatus(job.status),
        date_created=job.date_created,
        date_started=job.date_started,
        date_finished=job.date_finished,
        runtime_details=job.runtime_details,
        paths_out=PathsOut.model_validate(job.paths_out),
    )


def _place_inputs(
    storage: Storage, subject: str, files: FilesDown, entrypoint: CatalogEntrypoint
) -> dict[str, str]:
    """Expand the requested inputs to one ``"<mount dir>/<path>": key`` entry per file.

    A file id lands at ``<mount dir>/<file name>``; a folder's contents land directly
    under ``<mount dir>/`` keeping sub-folders (as upstream, so tools' commands keep
    working). Two different files landing on one path are refused, naming both."""
    placed: dict[str, str] = {}
    missing: list[str] = []
    mounts = entrypoint.handler.files_down
    for field, area in _INPUTS:
        value = getattr(files, field)
        ids: list[str] = [value] if isinstance(value, str) else list(value or [])
        if not ids:
            continue
        mount = getattr(mounts, field)
        if mount is None:
            raise BadRequest(f"this entrypoint takes no {field}")
        for raw in ids:
            key = user_key(subject, f"{area.value}/{raw}")
            entry = storage.stat(key)
            if entry is None:
                missing.append(f"{area.value}/{raw}")
                continue
            if entry.type is EntryType.FILE:
                pairs = [(posixpath.basename(key), key)]
            else:
                pairs = [
                    (posixpath.relpath(item.key, key), item.key) for item in storage.iter_files(key)
                ]
            if len(placed) + len(pairs) > MAX_INPUT_FILES:
                raise TooManyInputFiles(
                    f"the inputs of this job expand to more than {MAX_INPUT_FILES:,} files "
                    f"({area.value}/{raw} alone holds {len(pairs):,}); pass fewer or "
                    "smaller folders, or pack the files into an archive"
                )
            for relative, source in pairs:
                target = posixpath.join(mount.strip("/"), relative)
                other = placed.setdefault(target, source)
                if other != source:
                    raise InputClash(
                        f"inputs clash at /files/{target}: {_user_path(other)} and "
                        f"{_user_path(source)}"
                    )
    if missing:
        raise InputMissing(f"input files not found: {', '.join(missing)}")
    return placed


def _user_path(key: str) -> str:
    return key.split("/", 1)[1]


def _merge_hardware(requested: HardwareSpec | None, entrypoint: CatalogEntrypoint) -> HardwareSpec:
    """What the job asks of a worker: the catalog's needs (its GPU count included),
    raised (never lowered) by the user's request."""
    required = entrypoint.required_hardware.model_copy(
        update={"gpus": entrypoint.gpu_count or None}
    )
    if requested is None:
        return required

    def larger(a: int | None, b: int | None) -> int | None:
        return max(a, b) if a is not None and b is not None else (a if a is not None else b)

    return HardwareSpec(
        cpu_cores=larger(requested.cpu_cores, required.cpu_cores),
        memory=larger(requested.memory, required.memory),
        gpu_mem=larger(requested.gpu_mem, required.gpu_mem),
        gpu_model=requested.gpu_model or required.gpu_model,
        gpu_archi=requested.gpu_archi or required.gpu_archi,
        gpus=larger(requested.gpus, required.gpus),
    )
