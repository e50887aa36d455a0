"""Request and response shapes of the queue routes, and the worker's offer."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from labcloud.contract import Environment, JobStatus


@dataclass(frozen=True, slots=True)
class WorkerOffer:
    """What a pulling worker offers: its name, environment and hardware (memory in
    MiB). A job matches when each of its requirements is unset or satisfied."""

    name: str
    environment: Environment
    memory: int
    cpu_cores: int = 1
    gpu_mem: int = 0
    gpu_model: str | None = None
    gpu_archi: str | None = None


class EnqueuedJob(BaseModel):
    """Answer to ``POST /_jobs``: the queue id under which workers see the job."""

    id: int
    job_id: int
    status: JobStatus
