"""Answers of the internal routes about workers."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from labcloud.contract import JobStatus


class WorkerJob(BaseModel):
    """A job a worker holds: the user API's id and its status."""

    job_id: int
    status: JobStatus


class WorkerOffered(BaseModel):
    """Capacity offered in a pull (memory and GPU memory in MiB)."""

    memory: int
    cpu_cores: int
    gpus: int
    gpu_mem: int
    gpu_model: str | None
    gpu_archi: str | None


class ConnectedWorkerRead(BaseModel):
    """A connected worker: ``offered`` is its last pull's free capacity, ``peak``
    the largest offer since it connected (what it can run when idle)."""

    name: str
    environment: str
    groups: list[str]
    connected_at: datetime
    last_pull_at: datetime
    last_seen_at: datetime
    older_than: float
    offered: WorkerOffered
    peak: WorkerOffered
    jobs: list[WorkerJob]
