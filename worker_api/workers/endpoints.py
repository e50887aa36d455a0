"""Internal routes (the user API, with the internal key): connected workers, and
why a queued job waits."""

from __future__ import annotations

from fastapi import APIRouter

from labcloud.db import utcnow
from labcloud.web import IdPath
from worker_api.dependencies import InternalCaller, QueuePolicyDep, SessionDep
from worker_api.queue.waiting import JobWaiting, waiting_of
from worker_api.workers.dependencies import PresenceDep
from worker_api.workers.schemas import ConnectedWorkerRead
from worker_api.workers.service import connected_workers

router = APIRouter(tags=["internal"], dependencies=[InternalCaller])


@router.get("/_workers")
def list_workers(session: SessionDep, presence: PresenceDep) -> list[ConnectedWorkerRead]:
    """The connected workers (seen within WORKER_SEEN_WINDOW_SECONDS), their
    offers and the jobs they hold."""
    return connected_workers(session, since=presence.connected_since(utcnow()))


@router.get("/_jobs/{job_id}/waiting")
def job_waiting(
    job_id: IdPath, session: SessionDep, presence: PresenceDep, policy: QueuePolicyDep
) -> JobWaiting | None:
    """Why the job with this user API id waits; null when it is not queued here."""
    now = utcnow()
    return waiting_of(
        session, job_id, policy=policy, connected_since=presence.connected_since(now), now=now
    )
