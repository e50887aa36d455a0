"""Typed model of ``application_config.yaml`` and the view of it that users see.

The catalog nests application -> version -> entrypoint. Every level is validated
as a whole when the file is loaded, so a typo (an unknown key, a missing image, a
``files_up`` kind that does not exist, a memory of ``0``) is refused before it can
reach a job. ``CatalogEntrypoint`` doubles as the snapshot a job keeps of the
entrypoint it was started with: ``model_dump(mode="json")`` writes it in the
catalog's own spelling and ``model_validate`` reads it back.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import PurePosixPath
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    StrictInt,
    StringConstraints,
    field_validator,
)
from pydantic_core import PydanticCustomError

from labcloud.contract import ContainerSpec, HardwareSpec, OutputKind
from labcloud.errors import BadRequest

_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _check_name(value: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise PydanticCustomError(
            "catalog_name",
            "{name} is not a valid name: use only letters, digits, '.', '_' and '-'",
            {"name": repr(value)},
        )
    return value


def _check_env_name(value: str) -> str:
    if not _ENV_NAME_RE.fullmatch(value):
        raise PydanticCustomError(
            "env_name",
            "{name} is not a valid environment variable name "
            "(letters, digits and '_', not starting with a digit)",
            {"name": repr(value)},
        )
    return value


def _check_mount_dir(value: str) -> str:
    """A folder under the job's ``/files``: relative, without ``..``, normalised."""
    if not value.strip() or "\\" in value or "\x00" in value:
        raise PydanticCustomError(
            "mount_dir",
            "{dir} is not a valid folder: use a relative path with '/' separators",
            {"dir": repr(value)},
        )
    path = PurePosixPath(value)
    if path.is_absolute():
        raise PydanticCustomError(
            "mount_dir",
            "{dir} must be relative to /files (drop the leading '/')",
            {"dir": repr(value)},
        )
    if ".." in path.parts:
        raise PydanticCustomError("mount_dir", "{dir} must not contain '..'", {"dir": repr(value)})
    normalised = path.as_posix()
    if normalised == ".":
        raise PydanticCustomError(
            "mount_dir",
            "{dir} names /files itself; use a sub-folder",
            {"dir": repr(value)},
        )
    return normalised


CatalogName = Annotated[str, AfterValidator(_check_name)]
"""Name of an application, version or entrypoint: ``[A-Za-z0-9._-]+``."""

EnvName = Annotated[str, AfterValidator(_check_env_name)]
MountDir = Annotated[str, AfterValidator(_check_mount_dir)]
"""A folder relative to ``/files`` in the job's container."""

PositiveInt = Annotated[StrictInt, Field(gt=0)]


class _CatalogModel(BaseModel):
    # Aliases carry the catalog's upper-case hardware keys; only they are accepted
    # and written, so a snapshot reads exactly like the YAML it came from.
    model_config = ConfigDict(extra="forbid", frozen=True, serialize_by_alias=True)


class CatalogApp(_CatalogModel):
    """What runs in the container."""

    cmd: list[str] = Field(
        min_length=1,
        description="Shell fragments, joined with spaces and run by /bin/sh -c.",
    )
    env: list[EnvName] = Field(
        default_factory=list,
        description="Names of the environment variables a user may set for a job.",
    )

    @field_validator("cmd")
    @classmethod
    def _cmd_not_blank(cls, cmd: list[str]) -> list[str]:
        if not any(fragment.strip() for fragment in cmd):
            raise PydanticCustomError("empty_cmd", "cmd must contain a command, not only blanks")
        return cmd

    @field_validator("env")
    @classmethod
    def _env_unique(cls, env: list[str]) -> list[str]:
        duplicates = sorted({name for name in env if env.count(name) > 1})
        if duplicates:
            raise PydanticCustomError(
                "duplicate_env",
                "environment variables listed more than once: {names}",
                {"names": ", ".join(duplicates)},
            )
        return env


class CatalogFilesDown(_CatalogModel):
    """Where each kind of job input is placed, as a folder under ``/files``."""

    config_id: MountDir | None = None
    data_ids: MountDir | None = None
    artifact_ids: MountDir | None = None

    def mounts(self) -> dict[str, str]:
        """The input kinds this entrypoint accepts and their folders."""
        return {key: value for key, value in self.model_dump().items() if value is not None}


class CatalogHandler(_CatalogModel):
    """How the worker runs the entrypoint: which image, which folders go in and out."""

    image_url: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
    image_name: str | None = None
    image_version: str | None = None
    files_down: CatalogFilesDown = Field(default_factory=CatalogFilesDown)
    files_up: dict[OutputKind, MountDir] = Field(
        default_factory=dict,
        description="Result kind -> folder under /files whose files are uploaded after the run.",
    )


class CatalogHardware(_CatalogModel):
    """Resources a job of this entrypoint needs. Memory in MiB."""

    memory: PositiveInt | None = Field(default=None, alias="MEMORY")
    vcpu: PositiveInt | None = Field(default=None, alias="VCPU")
    gpu: StrictInt = Field(default=0, ge=0, alias="GPU")


class CatalogResources(_CatalogModel):
    """``aws_resources``: hardware and the time limit of a run (seconds)."""

    hardware: CatalogHardware = Field(default_factory=CatalogHardware)
    timeout: PositiveInt | None = None


class CatalogContainer(_CatalogModel):
    """``container``: how far the job's container is confined beyond the runner's
    defaults (LabCloud extension; copied into ``JobSpecs.container``)."""

    pids_limit: Annotated[StrictInt, Field(ge=1, le=1_000_000)] | None = Field(
        default=None,
        description="Most processes and threads the container may run "
        "(default: the runner's CONTAINER_PIDS_LIMIT).",
    )
    user: Annotated[str, StringConstraints(pattern=r"^[0-9]{1,10}(:[0-9]{1,10})?$")] | None = Field(
        default=None,
        description='"uid" or "uid:gid" to run as instead of the image\'s user.',
    )
    read_only_root: bool = Field(
        default=False,
        description="Mount the image's root file system read-only (/files and /tmp stay writable).",
    )

    def spec(self) -> ContainerSpec:
        """The wire model a worker applies."""
        return ContainerSpec(
            pids_limit=self.pids_limit, user=self.user, read_only_root=self.read_only_root
        )


Description = Annotated[str, StringConstraints(strip_whitespace=True, max_length=2000)]


class CatalogEntrypoint(_CatalogModel):
    """One runnable entrypoint of an application version; also a job's snapshot."""

    description: Description | None = Field(
        default=None, description="What the entrypoint does, for users choosing one."
    )
    app: CatalogApp
    handler: CatalogHandler
    aws_resources: CatalogResources = Field(default_factory=CatalogResources)
    container: CatalogContainer = Field(default_factory=CatalogContainer)

    @property
    def allowed_env(self) -> frozenset[str]:
        """Environment variable names a user may set on a job."""
        return frozenset(self.app.env)

    @property
    def timeout(self) -> int | None:
        """Seconds after which a run is stopped; ``None`` for no limit."""
        return self.aws_resources.timeout

    @property
    def required_hardware(self) -> HardwareSpec:
        """The catalog's hardware in the wire model a worker is matched against."""
        hardware = self.aws_resources.hardware
        return HardwareSpec(cpu_cores=hardware.vcpu, memory=hardware.memory)

    @property
    def gpu_count(self) -> int:
        """GPUs a run needs (``HardwareSpec`` carries no GPU count)."""
        return self.aws_resources.hardware.gpu


class UnknownApplication(BadRequest):
    """The requested application, version or entrypoint is not in the catalog."""


class _Public(BaseModel):
    model_config = ConfigDict(frozen=True, serialize_by_alias=True, populate_by_name=True)


class PublicApp(_Public):
    """``app`` as users see it: no command."""

    env: list[str] = Field(description="Environment variables a job may set (env_vars keys).")


class PublicHandler(_Public):
    """``handler`` as users see it: no image or credentials."""

    files_down: dict[str, str] = Field(
        description="Accepted input kinds (config_id, data_ids, artifact_ids) and the "
        "folder under /files where each is placed."
    )
    files_up: dict[OutputKind, str] = Field(
        description="Result kinds the job fills and the folder under /files each is uploaded from."
    )


class PublicHardware(_Public):
    """Resources reserved for a job of this entrypoint. Memory in MiB."""

    memory: int | None = Field(alias="MEMORY")
    vcpu: int | None = Field(alias="VCPU")
    gpu: int = Field(alias="GPU")


class PublicResources(_Public):
    hardware: PublicHardware
    timeout: int | None = Field(description="Seconds after which a run is stopped.")


class PublicEntrypoint(_Public):
    """What a user may know about an entrypoint, in the catalog's own nesting (as
    DECODE OpenCloud serves it: its web frontend reads ``app.env``), without the
    command, the image or anything else only workers need. ``description`` is a
    LabCloud addition beside those keys."""

    app: PublicApp
    handler: PublicHandler
    aws_resources: PublicResources
    description: str | None = Field(description="What the entrypoint does.")

    @classmethod
    def of(cls, entrypoint: CatalogEntrypoint) -> PublicEntrypoint:
        hardware = entrypoint.aws_resources.hardware
        return cls(
            app=PublicApp(env=list(entrypoint.app.env)),
            handler=PublicHandler(
                files_down=entrypoint.handler.files_down.mounts(),
                files_up=dict(entrypoint.handler.files_up),
            ),
            aws_resources=PublicResources(
                hardware=PublicHardware(
                    memory=hardware.memory, vcpu=hardware.vcpu, gpu=hardware.gpu
                ),
                timeout=entrypoint.timeout,
            ),
            description=entrypoint.description,
        )


class PublicCatalog(RootModel[dict[str, dict[str, dict[str, PublicEntrypoint]]]]):
    """The catalog as users see it: application -> version -> entrypoint -> details.
    Only names sit at the first three levels (DECODE's form lists every key there as
    a version or an entrypoint), so descriptions live in the entrypoints."""

    model_config = ConfigDict(frozen=True)


_Versions = Annotated[
    dict[CatalogName, Annotated[dict[CatalogName, CatalogEntrypoint], Field(min_length=1)]],
    Field(min_length=1),
]


class Catalog(RootModel[dict[CatalogName, _Versions]]):
    """The whole ``application_config.yaml``: application -> version -> entrypoint."""

    model_config = ConfigDict(frozen=True)

    def iter_entrypoints(self) -> Iterator[tuple[str, str, str, CatalogEntrypoint]]:
        """Every ``(application, version, entrypoint name, entrypoint)`` in file order."""
        for application, versions in self.root.items():
            for version, entrypoints in versions.items():
                for name, entrypoint in entrypoints.items():
                    yield application, version, name, entrypoint

    def get_entrypoint(self, application: str, version: str, entrypoint: str) -> CatalogEntrypoint:
        """The entrypoint, or ``UnknownApplication`` naming the first part that is unknown."""
        versions = self.root.get(application)
        if versions is None:
            raise UnknownApplication(
                f"unknown application {application!r}; known: {_known(self.root)}"
            )
        entrypoints = versions.get(version)
        if entrypoints is None:
            raise UnknownApplication(
                f"unknown version {version!r} of application {application!r}; "
                f"known: {_known(versions)}"
            )
        found = entrypoints.get(entrypoint)
        if found is None:
            raise UnknownApplication(
                f"unknown entrypoint {entrypoint!r} of application {application!r} "
                f"version {version!r}; known: {_known(entrypoints)}"
            )
        return found

    def public_view(self) -> PublicCatalog:
        """The user-visible catalog, without images or commands."""
        return self._public_view

    @cached_property
    def _public_view(self) -> PublicCatalog:
        # The catalog is immutable, so the view is built once per loaded file
        # instead of on every request.
        view: dict[str, dict[str, dict[str, PublicEntrypoint]]] = {}
        for application, version, name, entrypoint in self.iter_entrypoints():
            view.setdefault(application, {}).setdefault(version, {})[name] = PublicEntrypoint.of(
                entrypoint
            )
        return PublicCatalog(view)


def _known(names: Mapping[str, object]) -> str:
    return ", ".join(names) or "none"
