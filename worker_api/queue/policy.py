"""The queue's rules as settings (``QueuePolicy``) and the in-process signals its
transactions give once committed (``QueueSignals``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import event
from sqlalchemy.orm import Session


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    """Lease length and retry rules (settings ``TIMEOUT_FAILURE``, ``MAX_RETRIES``,
    ``RETRY_DIFFERENT``), and how long the last worker of a job cancelled with its
    outputs kept may upload the job's log (``CANCEL_LOG_GRACE_SECONDS``)."""

    lease_seconds: float = 300.0
    max_retries: int = 2
    retry_different: bool = False
    cancel_log_grace_seconds: float = 120.0


def _nothing() -> None:
    return None


@dataclass(frozen=True, slots=True)
class QueueSignals:
    """Called after the transaction that caused them commits, from whatever thread
    committed it: a job was enqueued or re-queued (wake long-polling pulls).

    Status changes wake the status relay through ``labcloud.outbox`` instead
    (``worker_api.queue.lifecycle``)."""

    job_enqueued: Callable[[], None] = _nothing


def after_commit(session: Session, callback: Callable[[], None]) -> None:
    """Call ``callback`` once the current transaction of ``session`` commits."""

    def fire(_session: Session) -> None:
        callback()

    event.listen(session, "after_commit", fire, once=True)
