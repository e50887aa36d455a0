"""The connected workers with what they hold, for the admins (no HTTP here)."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from labcloud.contract import LEASED_STATUSES
from worker_api.models import QueuedJob
from worker_api.workers import presence
from worker_api.workers.schemas import ConnectedWorkerRead, WorkerJob, WorkerOffered


def connected_workers(session: Session, *, since: datetime) -> list[ConnectedWorkerRead]:
    """The workers seen since ``since`` and the jobs each holds now (one read of
    ``ix_queued_jobs_worker_status`` for all of them)."""
    workers = presence.connected(session, since=since)
    held: dict[str, list[WorkerJob]] = defaultdict(list)
    if workers:
        rows = session.execute(
            select(QueuedJob.worker, QueuedJob.job_id, QueuedJob.status)
            .where(
                QueuedJob.worker.in_([worker.name for worker in workers]),
                QueuedJob.status.in_(LEASED_STATUSES),
            )
            .order_by(QueuedJob.job_id)
        ).all()
        for name, job_id, status in rows:
            if name is not None:
                held[name].append(WorkerJob(job_id=job_id, status=status))
    return [
        ConnectedWorkerRead(
            name=worker.name,
            environment=worker.environment,
            groups=list(worker.groups),
            connected_at=worker.connected_at,
            last_pull_at=worker.last_pull_at,
            last_seen_at=worker.last_seen_at,
            older_than=worker.older_than,
            offered=WorkerOffered(
                memory=worker.memory,
                cpu_cores=worker.cpu_cores,
                gpus=worker.gpus,
                gpu_mem=worker.gpu_mem,
                gpu_model=worker.gpu_model,
                gpu_archi=worker.gpu_archi,
            ),
            peak=WorkerOffered(
                memory=worker.peak_memory,
                cpu_cores=worker.peak_cpu_cores,
                gpus=worker.peak_gpus,
                gpu_mem=worker.peak_gpu_mem,
                gpu_model=worker.gpu_model,
                gpu_archi=worker.gpu_archi,
            ),
            jobs=held[worker.name],
        )
        for worker in workers
    ]
