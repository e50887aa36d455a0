"""Why a queued job is not running, from what this API knows: the job's
requirements, the connected workers' offers (``worker_api.workers.presence``), its
environment and age, its attempts, and its place in line.

The reasons, checked in this order (the first that blocks the job is given):

1. ``no_worker``: no connected worker takes jobs of its environment (or, with
   RETRY_DIFFERENT, only workers that already lost it are connected);
2. ``no_gpu``, ``gpu_model``, ``gpu_archi``, ``gpu_memory``, ``no_memory``,
   ``no_cpu``: no connected worker of its environment ever offered enough of
   that, since it connected (the largest offer seen, not the free capacity of
   the last pull: a busy worker offers less than it has). Each check narrows the
   workers the next one looks at, so the message names what is missing on the
   workers that have everything before it;
3. ``older_than``: a job for any environment waits until it is as old as the
   ``older_than`` of the workers that could run it;
4. ``busy``: workers that could run it are connected; ``position`` is its place
   in line (1 = next) among the queued jobs those workers would take, in pull
   order (priority, then age);
5. ``requeued`` instead of ``busy`` for a job re-queued after its worker was lost.

``attempt`` / ``max_attempts`` are set whenever the job was re-queued (whatever
the reason): the attempt it waits to start, of MAX_RETRIES + 1.

Cost: one read of the job, one of the connected workers (a few rows), and for
``busy`` one count of the queued jobs ahead of it that those workers could take
(on ``ix_queued_jobs_pull``, bounded by the queue's depth, never the history).
Measured on PostgreSQL 15 (2 cores) with 10,000 queued jobs beside 300,000 finished
ones and 5 connected workers: 8-10 ms p50, 10-15 ms p95 for a job deep in line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from enum import StrEnum

from pydantic import BaseModel
from sqlalchemy import ColumnElement, and_, false, func, literal_column, or_, select
from sqlalchemy.orm import Session

from labcloud.contract import Environment, JobStatus
from worker_api.models import ConnectedWorker, QueuedJob
from worker_api.queue import repository
from worker_api.queue.policy import QueuePolicy
from worker_api.workers import presence


class WaitingReason(StrEnum):
    NO_WORKER = "no_worker"
    NO_GPU = "no_gpu"
    NO_MEMORY = "no_memory"
    NO_CPU = "no_cpu"
    GPU_MODEL = "gpu_model"
    GPU_ARCHI = "gpu_archi"
    GPU_MEMORY = "gpu_memory"
    BUSY = "busy"
    OLDER_THAN = "older_than"
    REQUEUED = "requeued"


class JobWaiting(BaseModel):
    """Answer of ``GET /_jobs/{job_id}/waiting`` (null for a job not queued)."""

    reason: WaitingReason
    message: str
    position: int | None = None
    attempt: int | None = None
    max_attempts: int | None = None


def _mib(value: int) -> str:
    return f"{value / 1024:g} GiB" if value >= 1024 else f"{value} MiB"


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.0f} min"


# A requirement, the reason when no worker meets it, what it asks for and what
# the best worker offers (for the message), and whether a worker meets it.
_Check = tuple[
    WaitingReason,
    Callable[[QueuedJob], bool],
    Callable[[QueuedJob, Sequence[ConnectedWorker]], str],
    Callable[[QueuedJob, ConnectedWorker], bool],
]

_CHECKS: tuple[_Check, ...] = (
    (
        WaitingReason.NO_GPU,
        lambda job: job.gpus > 0,
        lambda job, workers: (
            f"it needs {job.gpus} GPU{'s' if job.gpus > 1 else ''} and no connected worker "
            f"of its environment offers {'that many' if job.gpus > 1 else 'one'} "
            f"(at most {max(w.peak_gpus for w in workers)})"
        ),
        lambda job, worker: worker.peak_gpus >= job.gpus,
    ),
    (
        WaitingReason.GPU_MODEL,
        lambda job: job.gpu_model is not None,
        lambda job, workers: (
            f"it needs a GPU of model {job.gpu_model} and the connected GPU workers have "
            + (", ".join(sorted({w.gpu_model or "an unnamed model" for w in workers})))
        ),
        lambda job, worker: worker.gpu_model == job.gpu_model,
    ),
    (
        WaitingReason.GPU_ARCHI,
        lambda job: job.gpu_archi is not None,
        lambda job, workers: (
            f"it needs a GPU of architecture {job.gpu_archi} and the connected GPU workers have "
            + (", ".join(sorted({w.gpu_archi or "an unnamed architecture" for w in workers})))
        ),
        lambda job, worker: worker.gpu_archi == job.gpu_archi,
    ),
    (
        WaitingReason.GPU_MEMORY,
        lambda job: job.gpu_mem > 0,
        lambda job, workers: (
            f"it needs {_mib(job.gpu_mem)} of GPU memory and the connected GPU workers offer "
            f"at most {_mib(max(w.peak_gpu_mem for w in workers))}"
        ),
        lambda job, worker: worker.peak_gpu_mem >= job.gpu_mem,
    ),
    (
        WaitingReason.NO_MEMORY,
        lambda job: job.memory > 0,
        lambda job, workers: (
            f"it needs {_mib(job.memory)} of memory and the connected workers offer at most "
            f"{_mib(max(w.peak_memory for w in workers))}"
        ),
        lambda job, worker: worker.peak_memory >= job.memory,
    ),
    (
        WaitingReason.NO_CPU,
        lambda job: job.cpu_cores > 0,
        lambda job, workers: (
            f"it needs {job.cpu_cores} CPU cores and the connected workers offer at most "
            f"{max(w.peak_cpu_cores for w in workers)}"
        ),
        lambda job, worker: worker.peak_cpu_cores >= job.cpu_cores,
    ),
)


def waiting_of(
    session: Session,
    job_id: int,
    *,
    policy: QueuePolicy,
    connected_since: datetime,
    now: datetime,
) -> JobWaiting | None:
    """Why the job with user API id ``job_id`` waits; None unless it is queued."""
    job = repository.get_by_job_id(session, job_id)
    if job is None or job.status is not JobStatus.QUEUED:
        return None
    attempt = max_attempts = None
    if job.attempts > 0:
        attempt, max_attempts = job.attempts + 1, policy.max_retries + 1
    workers = presence.connected(session, since=connected_since)

    def answer(reason: WaitingReason, message: str, position: int | None = None) -> JobWaiting:
        if attempt is not None:
            message += (
                f" (attempt {attempt} of {max_attempts}, re-queued after its worker was lost)"
            )
        return JobWaiting(
            reason=reason,
            message=message[0].upper() + message[1:] + ".",
            position=position,
            attempt=attempt,
            max_attempts=max_attempts,
        )

    candidates = [
        worker
        for worker in workers
        if job.environment is None or worker.environment == job.environment
    ]
    if not candidates:
        where = f" for environment {job.environment}" if job.environment else ""
        return answer(WaitingReason.NO_WORKER, f"no worker{where} is connected")
    for reason, applies, explain, meets in _CHECKS:
        if not applies(job):
            continue
        fitting = [worker for worker in candidates if meets(job, worker)]
        if not fitting:
            return answer(reason, explain(job, candidates))
        candidates = fitting
    if policy.retry_different and job.failed_workers:
        others = [worker for worker in candidates if worker.name not in job.failed_workers]
        if not others:
            return answer(
                WaitingReason.NO_WORKER,
                "the connected workers that could run it already lost it once, and "
                "RETRY_DIFFERENT gives it to another worker only",
            )
        candidates = others
    if job.environment is None:
        age = (now - job.created_at).total_seconds()
        if all(worker.older_than > age for worker in candidates):
            needed = min(worker.older_than for worker in candidates)
            return answer(
                WaitingReason.OLDER_THAN,
                f"it is for any environment, and the workers that could run it take such "
                f"jobs once they are {_seconds(needed)} old (it is {_seconds(age)} old)",
            )
    position = _jobs_ahead(session, job, candidates, now=now) + 1
    where = "next in line" if position == 1 else f"number {position} in line"
    if attempt is not None:
        return answer(
            WaitingReason.REQUEUED,
            f"re-queued after its worker was lost; {where} for the workers that can run it",
            position,
        )
    return answer(
        WaitingReason.BUSY,
        f"the workers that can run it are busy; it is {where}",
        position,
    )


def _takes(worker: ConnectedWorker, now: datetime) -> ColumnElement[bool]:
    """Queued jobs this worker would take (its environment and largest offer)."""
    job = QueuedJob
    environment = Environment(worker.environment).value
    return and_(
        or_(
            job.environment == environment,
            and_(
                job.environment.is_(None),
                job.created_at <= now - timedelta(seconds=worker.older_than),
            ),
        ),
        job.cpu_cores <= worker.peak_cpu_cores,
        job.memory <= worker.peak_memory,
        job.gpus <= worker.peak_gpus,
        job.gpu_mem <= worker.peak_gpu_mem,
        or_(job.gpu_model.is_(None), job.gpu_model == worker.gpu_model)
        if worker.gpu_model is not None
        else job.gpu_model.is_(None),
        or_(job.gpu_archi.is_(None), job.gpu_archi == worker.gpu_archi)
        if worker.gpu_archi is not None
        else job.gpu_archi.is_(None),
    )


def _jobs_ahead(
    session: Session, waiting: QueuedJob, workers: Sequence[ConnectedWorker], *, now: datetime
) -> int:
    """Queued jobs ahead of ``waiting`` in pull order that one of ``workers`` would take."""
    job = QueuedJob
    ahead = or_(
        job.priority > waiting.priority,
        and_(
            job.priority == waiting.priority,
            or_(
                job.created_at < waiting.created_at,
                and_(job.created_at == waiting.created_at, job.id < waiting.id),
            ),
        ),
    )
    taken = or_(false(), *(_takes(worker, now) for worker in workers))
    # The status as a literal, so that PostgreSQL may read the partial pull index
    # (queued rows only) whatever the plan cache does (see worker_api.queue.lease).
    queued: ColumnElement[str] = literal_column(f"'{JobStatus.QUEUED.value}'")
    count = session.scalar(
        select(func.count()).select_from(job).where(job.status == queued, ahead, taken)
    )
    return int(count or 0)
