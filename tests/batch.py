"""AWS Batch on the local emulator: a compute environment, job queues, a tool image.

moto's Batch runs each job as a real container on the local Docker engine, with a
locally present image (no registry). ``batch_queues`` creates what a deployment
would: an ``UNMANAGED`` compute environment (its ``serviceRole`` a role moto
accepts) and two job queues on it, one for CPU and one for GPU jobs (the emulator
runs GPU jobs like any other). ``batch_image`` imports a static busybox with the
applets the backend's ``/files`` prefix and the tests' scripts use.
``slow_transitions`` makes moto's job states advance at a pace a test can watch.
"""

from __future__ import annotations

import json
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest
from docker.errors import ImageNotFound

from tests.aws import MotoServer

# The tag names the applet set: an image imported with fewer applets is not reused.
BATCH_IMAGE = "labcloud-test/busybox-batch:1"
BUSYBOX = Path("/bin/busybox")
APPLETS = (
    "sh", "echo", "cat", "sleep", "ls", "mkdir", "ln", "rmdir", "true", "false", "env", "tee",
    "wc", "seq",
)  # fmt: skip


@dataclass(frozen=True)
class BatchQueues:
    """The emulator's job queues (names) and compute environment (ARN)."""

    cpu: str
    gpu: str
    compute_environment: str


def batch_queues(
    aws: MotoServer, *, cpu: str = "labcloud-cpu", gpu: str = "labcloud-gpu"
) -> BatchQueues:
    """Create an UNMANAGED compute environment and the CPU and GPU job queues."""
    iam = aws.client("iam")
    role = iam.create_role(
        RoleName="labcloud-batch-service",
        AssumeRolePolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"Service": "batch.amazonaws.com"},
                        "Action": "sts:AssumeRole",
                    }
                ],
            }
        ),
    )["Role"]["Arn"]
    batch = aws.client("batch")
    environment = batch.create_compute_environment(
        computeEnvironmentName="labcloud-local",
        type="UNMANAGED",
        state="ENABLED",
        serviceRole=role,
    )["computeEnvironmentArn"]
    for name in (cpu, gpu):
        batch.create_job_queue(
            jobQueueName=name,
            state="ENABLED",
            priority=1,
            computeEnvironmentOrder=[{"order": 1, "computeEnvironment": environment}],
        )
    return BatchQueues(cpu=cpu, gpu=gpu, compute_environment=environment)


def slow_transitions(aws: MotoServer, seconds: float) -> None:
    """Let each of moto's Batch job states last ``seconds`` (moto: almost none)."""
    body = json.dumps(
        {"model_name": "batch::job", "transition": {"progression": "time", "seconds": seconds}}
    ).encode()
    request = urllib.request.Request(
        f"{aws.endpoint_url}/moto-api/state-manager/set-transition", data=body, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10):
        pass


def batch_image(engine: docker.DockerClient, folder: Path) -> str:
    """``BATCH_IMAGE``, imported from a static busybox once per engine; ``folder``
    holds the root file system's archive."""
    try:
        engine.images.get(BATCH_IMAGE)
        return BATCH_IMAGE
    except ImageNotFound:
        pass
    if not BUSYBOX.is_file():
        pytest.fail(f"{BUSYBOX} (a static busybox) is needed to build the test image")
    archive = folder / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(BUSYBOX, arcname="bin/busybox")
        for applet in APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            tar.addfile(link)
        # An empty /files, as tool images often have: the prefix replaces it.
        for name in ("tmp", "files"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777
            tar.addfile(info)
    repository, tag = BATCH_IMAGE.split(":")
    engine.api.import_image_from_file(str(archive), repository=repository, tag=tag)
    return BATCH_IMAGE
