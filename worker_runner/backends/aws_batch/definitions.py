"""Job definitions and the command that makes ``/files`` a job's folder.

A Batch job definition fixes the image, the resources and the volumes; a job
only overrides the command and the environment. The backend registers one
definition per image and resource shape, named after a hash of everything it
holds, so a restarted runner finds the same one again (``DescribeJobDefinitions``
by name, ``ACTIVE``) instead of registering a new revision per job.

Every definition mounts the shared file system (an EFS volume with transit
encryption, or ``BATCH_SHARED_DIR`` as a host path on an emulator) at
``SHARED_MOUNT``. A job's folder is a sub-folder of it, which a definition
cannot name; the job's command therefore starts with a prefix that points
``/files`` at its folder and then ``exec``\\s the job's own command (as DECODE
OpenCloud's jobs do). The folder travels as an argument, never inside the
script, so no path needs quoting. What this asks of a tool image: no
``ENTRYPOINT`` (Batch would hand it the prefix as arguments), a ``/bin/sh``, a
root user and a writable ``/`` (the link is created there), and no non-empty
``/files`` folder of its own.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from worker_runner.backends.aws_batch.settings import BatchSettings
from worker_runner.backends.base import BackendError, Placement

# Where every job sees the shared file system.
SHARED_MOUNT = "/mnt/labcloud"
VOLUME_NAME = "labcloud-shared"
DEFINITION_PREFIX = "labcloud-"
# Exit status of the prefix when it cannot make /files (the job's command never ran).
PREFIX_FAILED_EXIT = 125
FILES_PREFIX = (
    "[ -L /files ] || [ ! -e /files ] || rmdir /files 2>/dev/null || "
    '{ echo "labcloud: the image has a non-empty /files; cannot mount the job folder" >&2; '
    f"exit {PREFIX_FAILED_EXIT}; }}; "
    f'ln -sfn "$1" /files || exit {PREFIX_FAILED_EXIT}; '
    'shift; exec "$@"'
)


def files_command(folder: str, command: Sequence[str]) -> list[str]:
    """``command`` run with ``/files`` pointing at ``folder`` (a path in the job's
    container). ``sh -c SCRIPT NAME ARG...`` gives the script ``$0`` = NAME and
    ``$1`` = the folder, then the command's words as they are."""
    return ["/bin/sh", "-c", FILES_PREFIX, "labcloud-files", folder, *command]


@dataclass(frozen=True, slots=True)
class Shape:
    """What a job definition fixes besides the volumes: image and resources."""

    image: str
    vcpus: int
    memory: int
    gpus: int

    @classmethod
    def of(cls, image: str, placement: Placement, settings: BatchSettings) -> Shape:
        """The shape of a run of ``image`` in ``placement``. Batch on EC2 takes whole
        vCPUs: a fractional share is rounded up."""
        cpus = placement.cpus if placement.cpus is not None else settings.batch_default_vcpus
        memory = placement.memory if placement.memory is not None else settings.batch_default_memory
        return cls(image=image, vcpus=max(1, math.ceil(cpus)), memory=memory, gpus=placement.gpus)

    def resource_requirements(self) -> list[dict[str, str]]:
        requirements = [
            {"type": "VCPU", "value": str(self.vcpus)},
            {"type": "MEMORY", "value": str(self.memory)},
        ]
        if self.gpus:
            requirements.append({"type": "GPU", "value": str(self.gpus)})
        return requirements


def shared_volume(settings: BatchSettings) -> dict[str, Any]:
    """The volume of the shared file system, as job definitions name it."""
    if settings.batch_efs_file_system_id:
        return {
            "name": VOLUME_NAME,
            "efsVolumeConfiguration": {
                "fileSystemId": settings.batch_efs_file_system_id,
                "rootDirectory": settings.batch_efs_root_directory,
                "transitEncryption": "ENABLED",
            },
        }
    return {"name": VOLUME_NAME, "host": {"sourcePath": str(settings.batch_shared_dir)}}


def container_properties(shape: Shape, settings: BatchSettings) -> dict[str, Any]:
    return {
        "image": shape.image,
        "resourceRequirements": shape.resource_requirements(),
        "volumes": [shared_volume(settings)],
        "mountPoints": [
            {"sourceVolume": VOLUME_NAME, "containerPath": SHARED_MOUNT, "readOnly": False}
        ],
    }


def definition_name(properties: dict[str, Any]) -> str:
    """A name that changes whenever anything the definition holds does."""
    digest = hashlib.sha256(json.dumps(properties, sort_keys=True).encode()).hexdigest()
    return f"{DEFINITION_PREFIX}{digest[:32]}"


class JobDefinitions:
    """Registers a job definition once per shape and remembers its ARN."""

    def __init__(self, batch: Any, settings: BatchSettings) -> None:
        self._batch = batch
        self._settings = settings
        self._lock = threading.Lock()
        self._arns: dict[Shape, str] = {}

    def arn(self, shape: Shape) -> str:
        """The ARN of the definition of ``shape``: remembered, found by name, or
        registered. Raises ``BackendError`` when Batch refuses."""
        # One lock for all: registering is rare (once per shape per runner's life),
        # and many jobs of one new shape must not register it many times.
        with self._lock:
            known = self._arns.get(shape)
            if known is not None:
                return known
            properties = container_properties(shape, self._settings)
            name = definition_name(properties)
            try:
                arn = self._find(name) or self._register(name, properties)
            except (ClientError, BotoCoreError) as exc:
                raise BackendError(f"could not register a Batch job definition: {exc}") from exc
            self._arns[shape] = arn
            return arn

    def _find(self, name: str) -> str | None:
        response = self._batch.describe_job_definitions(jobDefinitionName=name, status="ACTIVE")
        found = [d for d in response.get("jobDefinitions", []) if d.get("status") == "ACTIVE"]
        if not found:
            return None
        return str(max(found, key=lambda d: int(d.get("revision", 0)))["jobDefinitionArn"])

    def _register(self, name: str, properties: dict[str, Any]) -> str:
        response = self._batch.register_job_definition(
            jobDefinitionName=name,
            type="container",
            containerProperties=properties,
            platformCapabilities=["EC2"],
            # The job's tags (runner, job) reach the ECS task too.
            propagateTags=True,
        )
        return str(response["jobDefinitionArn"])
