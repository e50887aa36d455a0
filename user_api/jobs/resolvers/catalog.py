"""The catalog resolver: a job of a catalog entrypoint on the user's files
(``POST /jobs``, DECODE's ``JobCreate``)."""

from __future__ import annotations

import posixpath

from labcloud.contract import FileArea, HardwareSpec
from labcloud.errors import BadRequest, Conflict, PayloadTooLarge
from labcloud.storage.base import EntryType, Storage
from labcloud.storage.paths import user_key
from user_api.catalog.schemas import Catalog, CatalogEntrypoint
from user_api.jobs.drafts import Image, JobDraft, JobRecord, result_folders
from user_api.jobs.schemas import MAX_INPUT_FILES, FilesDown, JobCreate

# JobCreate's input fields, the area each one names paths in, and the key of the
# entrypoint's ``handler.files_down`` that says where they are mounted.
_INPUTS: tuple[tuple[str, FileArea], ...] = (
    ("config_id", FileArea.CONFIG),
    ("data_ids", FileArea.DATA),
    ("artifact_ids", FileArea.ARTIFACT),
)


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


def resolve_from_catalog(
    payload: JobCreate, *, subject: str, catalog: Catalog, storage: Storage
) -> JobDraft:
    """Check ``payload`` against the catalog and the files of the account
    ``subject``, and expand it into a draft: the entrypoint's image, command, limits
    and container options; the environment variables it allows; the inputs, one per
    file, at the entrypoint's mount folders; the catalog's hardware raised by the
    user's request. Refused when the job's result folders already hold files."""
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
    inputs = _place_inputs(storage, subject, payload.attributes.files_down, entrypoint)
    hardware = _merge_hardware(payload.hardware, entrypoint)
    _check_result_folders_empty(storage, subject, result_folders(payload.job_name))
    handler = entrypoint.handler
    return JobDraft(
        job_name=payload.job_name,
        image=Image(url=handler.image_url, name=handler.image_name, version=handler.image_version),
        entrypoint=ref.entrypoint,
        command=list(entrypoint.app.cmd),
        env=env,
        inputs=inputs,
        outputs=dict(handler.files_up),
        hardware=hardware,
        timeout=entrypoint.timeout,
        container=entrypoint.container.spec(),
        environment=payload.environment,
        priority=payload.priority,
        record=JobRecord(
            application=ref.model_dump(mode="json"),
            attributes=payload.attributes.model_dump(mode="json"),
            hardware=payload.hardware.model_dump(mode="json") if payload.hardware else {},
            entrypoint_snapshot=entrypoint.model_dump(mode="json"),
        ),
    )


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
