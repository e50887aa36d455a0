"""``labcloud up --aws-emulator --backend aws-batch``: the stack's runners run jobs
through AWS Batch on the emulator.

``provision_batch`` creates what a Batch deployment has (docs/aws.md, "AWS Batch"): the
service role, an ``UNMANAGED`` compute environment and a CPU and a GPU job queue on it.
moto runs each submitted job as a real container on the local Docker engine; the
folder that stands in for EFS is a host path (``BATCH_EFS_FILE_SYSTEM_ID`` empty), the
same on the runner's side and in the job definitions. ``EmulatedBatch.runner_settings``
are the settings that make a runner use them; the stack's runners log in with accounts
in groups ``workers`` and ``cloud``, as DECODE's cloud workers do.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from labcloud_cli.stack.aws_emulator import Emulator, step
from labcloud_cli.stack.processes import StartupError


class StackBackend(StrEnum):
    """What runs the stack's jobs (``labcloud up --backend``); the values are the
    runner's ``BACKEND`` names."""

    DOCKER = "docker"
    AWS_BATCH = "aws-batch"


SERVICE_ROLE_NAME = "labcloud-batch-service"
COMPUTE_ENVIRONMENT_NAME = "labcloud"
JOB_QUEUE_NAME = "labcloud-cpu"
GPU_JOB_QUEUE_NAME = "labcloud-gpu"
# The folder in the mode's state folder that stands in for EFS (emptied at each start
# with the rest of that folder: its job folders belonged to the previous emulator).
SHARED_FOLDER = "batch-shared"
# Jobs in flight per runner: the emulator runs every one as a container on this
# machine, so the stack keeps it modest (a deployment sets its own).
MAX_IN_FLIGHT = 20
POLL_INTERVAL_S = 1.0
# The trust policy AWS gives Batch's service role (AWSBatchServiceRole).
_SERVICE_ROLE_TRUST = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Principal": {"Service": "batch.amazonaws.com"},
            "Action": "sts:AssumeRole",
        }
    ],
}


@dataclass(frozen=True)
class EmulatedBatch:
    """The Batch resources ``provision_batch`` created."""

    service_role_arn: str
    compute_environment_arn: str
    job_queue: str
    gpu_job_queue: str
    shared_dir: Path

    def runner_settings(self) -> dict[str, str]:
        """A runner's settings for these resources (its file in ``DIR/runners/``)."""
        return {
            "BACKEND": StackBackend.AWS_BATCH.value,
            "BATCH_JOB_QUEUE": self.job_queue,
            "BATCH_GPU_JOB_QUEUE": self.gpu_job_queue,
            "BATCH_SHARED_DIR": str(self.shared_dir),
            # Empty: the job definitions mount BATCH_SHARED_DIR as a host path, which
            # is the same folder on this machine; on AWS, an EFS file system's id.
            "BATCH_EFS_FILE_SYSTEM_ID": "",
            "BATCH_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT),
            # The stack has no local runner that should get a job first: jobs for any
            # environment (the example session's) go to Batch at once.
            "BATCH_OLDER_THAN": "0",
            # DescribeJobs on the emulator costs nothing: follow jobs closely.
            "BATCH_POLL_INTERVAL": str(POLL_INTERVAL_S),
        }

    def describe(self) -> str:
        """What was created, for the start message."""
        return (
            f"  Batch role      {self.service_role_arn}\n"
            f"  compute env     {self.compute_environment_arn} (UNMANAGED: jobs run as\n"
            "                  containers on this machine's Docker engine)\n"
            f"  job queues      {self.job_queue} (BATCH_JOB_QUEUE), "
            f"{self.gpu_job_queue} (BATCH_GPU_JOB_QUEUE)\n"
            f"  shared folder   {self.shared_dir} (BATCH_SHARED_DIR, in place of EFS)"
        )


def provision_batch(emulator: Emulator, shared_dir: Path) -> EmulatedBatch:
    """Create Batch's service role, an ``UNMANAGED`` compute environment with a CPU
    and a GPU job queue, and the empty folder ``shared_dir`` that the runner stages
    jobs in and their containers mount."""
    shutil.rmtree(shared_dir, ignore_errors=True)
    try:
        shared_dir.mkdir(parents=True)
    except OSError as exc:
        raise StartupError(f"cannot create the Batch shared folder {shared_dir}: {exc}") from None
    with step("create Batch's service role in IAM"):
        role_arn: str = emulator.client("iam").create_role(
            RoleName=SERVICE_ROLE_NAME,
            AssumeRolePolicyDocument=json.dumps(_SERVICE_ROLE_TRUST),
            Description="AWS Batch's service role for LabCloud's compute environment",
        )["Role"]["Arn"]
    batch = emulator.client("batch")
    with step("create the Batch compute environment"):
        environment_arn: str = batch.create_compute_environment(
            computeEnvironmentName=COMPUTE_ENVIRONMENT_NAME,
            type="UNMANAGED",
            state="ENABLED",
            serviceRole=role_arn,
        )["computeEnvironmentArn"]
    for queue in (JOB_QUEUE_NAME, GPU_JOB_QUEUE_NAME):
        with step(f"create the Batch job queue {queue}"):
            batch.create_job_queue(
                jobQueueName=queue,
                state="ENABLED",
                priority=1,
                computeEnvironmentOrder=[{"order": 1, "computeEnvironment": environment_arn}],
            )
    return EmulatedBatch(
        service_role_arn=role_arn,
        compute_environment_arn=environment_arn,
        job_queue=JOB_QUEUE_NAME,
        gpu_job_queue=GPU_JOB_QUEUE_NAME,
        shared_dir=shared_dir,
    )
