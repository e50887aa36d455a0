"""Settings of the AWS Batch backend (``BACKEND=aws-batch``).

The names ``BATCH_JOB_QUEUE``, ``BATCH_GPU_JOB_QUEUE``, ``BATCH_SHARED_DIR``,
``BATCH_EFS_FILE_SYSTEM_ID`` and ``BATCH_MAX_IN_FLIGHT`` are fixed: deployments and
``labcloud up`` rely on them. The region, endpoint and credentials are boto3's own
variables (``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``, ...), so the runner needs
no setting of its own to run against the real service or an emulator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import Field, model_validator

from worker_runner.backends.base import BackendSettings

# The contract's bound on ``older_than`` (worker API: MAX_AGE_SECONDS is a day).
MAX_OLDER_THAN_S = 86_400


class BatchSettings(BackendSettings):
    """Where Batch jobs go, what they mount, and how much this runner keeps in flight.

    A cloud runner's capacity is not its host's: it offers jobs up to the
    ``BATCH_MAX_*`` ceilings (what the compute environments' instance types can
    give one job) and keeps up to ``BATCH_MAX_IN_FLIGHT`` of them submitted."""

    batch_job_queue: str = Field(min_length=1, description="Job queue of CPU jobs.")
    batch_gpu_job_queue: str | None = Field(
        default=None, description="Job queue of GPU jobs; defaults to BATCH_JOB_QUEUE."
    )
    batch_shared_dir: Path = Field(
        description=(
            "Where the shared file system (EFS) is mounted on the runner's host: the job "
            "folders live here, and the jobs see the same folders."
        )
    )
    batch_efs_file_system_id: str = Field(
        default="",
        description=(
            "The EFS the job definitions mount; empty: they mount BATCH_SHARED_DIR as a "
            "host path (an emulator running jobs on this host)."
        ),
    )
    batch_efs_root_directory: str = Field(
        default="/",
        pattern=r"^/",
        description="The folder of the EFS that BATCH_SHARED_DIR shows on the runner's host.",
    )
    batch_max_in_flight: int = Field(
        default=50, ge=1, le=10_000, description="Most Batch jobs this runner keeps at once."
    )
    batch_max_vcpus: int = Field(default=64, ge=1, description="Most vCPUs one job may ask for.")
    batch_max_memory: int = Field(
        default=262_144, ge=128, description="Most memory one job may ask for (MiB)."
    )
    batch_max_gpus: int = Field(default=8, ge=0, description="Most GPUs one job may ask for.")
    batch_gpu_memory: int = Field(
        default=24_576, ge=0, description="Memory of each GPU of the GPU queue's instances (MiB)."
    )
    batch_gpu_model: str | None = Field(
        default=None, description="GPU model of the GPU queue's instances, offered in pulls."
    )
    batch_gpu_archi: str | None = Field(
        default=None, description="GPU architecture of the GPU queue's instances."
    )
    batch_default_vcpus: int = Field(
        default=1, ge=1, description="vCPUs of a job that does not say how many it needs."
    )
    batch_default_memory: int = Field(
        default=2048, ge=128, description="Memory of a job that does not say (MiB)."
    )
    batch_older_than: int = Field(
        default=600,
        ge=0,
        le=MAX_OLDER_THAN_S,
        description=(
            "Seconds a job for any environment waits before this cloud runner takes it "
            "(local workers get it first)."
        ),
    )
    batch_max_queue_wait: float = Field(
        default=3600.0,
        ge=1,
        description=(
            "Seconds a job may wait in Batch's queue (SUBMITTED to STARTING) before it is "
            "terminated and fails: a job no compute environment can place waits forever."
        ),
    )
    batch_poll_interval: float = Field(
        default=5.0,
        ge=0.05,
        le=300,
        description="Seconds between two DescribeJobs of all the jobs in flight.",
    )

    @model_validator(mode="after")
    def _resolve_shared_dir(self) -> Self:
        # A host-path volume must be absolute, and the folder must not move when the
        # working directory does.
        self.batch_shared_dir = self.batch_shared_dir.expanduser().resolve()
        # The job folders are the shared folder's: PATH_BASE follows it.
        self.path_base = self.batch_shared_dir
        if self.batch_default_vcpus > self.batch_max_vcpus:
            raise ValueError("BATCH_DEFAULT_VCPUS must not exceed BATCH_MAX_VCPUS")
        if self.batch_default_memory > self.batch_max_memory:
            raise ValueError("BATCH_DEFAULT_MEMORY must not exceed BATCH_MAX_MEMORY")
        return self

    @property
    def gpu_job_queue(self) -> str:
        """The queue of GPU jobs."""
        return self.batch_gpu_job_queue or self.batch_job_queue
