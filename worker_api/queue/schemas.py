"""Request and response shapes of the queue routes, and the worker's offer."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from labcloud.contract import Environment, JobStatus


@dataclass(frozen=True, slots=True)
class WorkerOffer:
    """What a pulling worker offers: its name, environment and hardware (memory in
    MiB). A job matches when each of its requirements is unset or satisfied.

    ``gpus`` is the number of free GPUs, each with ``gpu_mem`` MiB and of model
    ``gpu_model`` / architecture ``gpu_archi``; see ``offered_gpus`` for workers
    that do not say."""

    name: str
    environment: Environment
    memory: int
    cpu_cores: int = 1
    gpu_mem: int = 0
    gpu_model: str | None = None
    gpu_archi: str | None = None
    gpus: int = 0


def offered_gpus(gpus: int | None, gpu_mem: int) -> int:
    """Free GPUs a pull offers. The upstream worker never sends ``gpus``: it offers
    one GPU when it reports GPU memory, none otherwise."""
    if gpus is not None:
        return gpus
    return 1 if gpu_mem > 0 else 0


class EnqueuedJob(BaseModel):
    """Answer to ``POST /_jobs``: the queue id under which workers see the job."""

    id: int
    job_id: int
    status: JobStatus
