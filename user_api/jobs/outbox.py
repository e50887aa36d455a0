"""The worker outbox: new jobs and cancellations for the worker API, delivered by
the outbox relay (``labcloud.outbox.Relay``) under the name ``worker_outbox``.

Messages are committed with the change they announce and deleted only once the
worker API acknowledged them, so a job submitted while the worker API is down is
delivered when it comes back. Delivery is strictly in outbox order (the relay's
lock keeps it across processes), which keeps a cancellation behind the enqueue it
cancels. Both worker API routes are idempotent, so a message delivered twice (after
a crash between sending and deleting) is harmless.

A round reads up to ``BATCH_SIZE`` messages, and consecutive enqueues go out as one
``POST /_jobs/batch``: under a burst of submissions, one request and two statements
per round instead of per job.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from labcloud.contract import FailureKind, JobStatus, Outcome
from labcloud.outbox import Acknowledged, Delivery, Failed, Rejected, Round, note_written
from user_api.clients.worker_api import WorkerApiClient, WorkerApiRefused, WorkerApiUnavailable
from user_api.jobs.lifecycle import Cause, transition
from user_api.models import JOBS, WORKER_OUTBOX, OutboxKind

logger = logging.getLogger(__name__)

NAME = "worker_outbox"
# Messages read per round, and the most enqueues sent in one request (the worker
# API accepts up to 500).
BATCH_SIZE = 200
# What the worker API answers for a message already acted upon: a job it has
# already, a job it no longer has to cancel. Both count as delivered.
_ALREADY_DONE = frozenset({404, 409})


@dataclass(frozen=True, slots=True)
class WorkerMessage:
    id: int
    job_id: int
    kind: OutboxKind
    payload: dict[str, Any] | None


def _runs(messages: Sequence[WorkerMessage]) -> Iterator[list[WorkerMessage]]:
    """Consecutive enqueues together, every cancellation on its own (order kept)."""
    run: list[WorkerMessage] = []
    for message in messages:
        if message.kind is OutboxKind.ENQUEUE:
            run.append(message)
            continue
        if run:
            yield run
            run = []
        yield [message]
    if run:
        yield run


class WorkerApiOutbox:
    """The worker outbox's side of its relay (``labcloud.outbox.Outbox``)."""

    name = NAME

    def __init__(self, client: WorkerApiClient, *, batch_size: int = BATCH_SIZE) -> None:
        self._client = client
        self._batch_size = batch_size
        # Cleared when the worker API predates POST /_jobs/batch: one job per request.
        self._batch_route = True

    # -- the database side (in the relay's transaction) ------------------------------

    def claim(self, session: Session) -> list[WorkerMessage]:
        """The oldest messages, in the order they were written."""
        outbox = WORKER_OUTBOX.c
        rows = session.execute(
            select(outbox.id, outbox.job_id, outbox.kind, outbox.payload)
            .order_by(outbox.id)
            .limit(self._batch_size)
        )
        return [
            WorkerMessage(row.id, row.job_id, OutboxKind(row.kind), row.payload) for row in rows
        ]

    def settle(self, session: Session, batch: Round[WorkerMessage]) -> None:
        outbox = WORKER_OUTBOX.c
        done = [message.id for message in batch.acknowledged]
        done += [rejected.message.id for rejected in batch.rejected]
        deleted: set[int] = set()
        if done:
            result = session.execute(
                delete(WORKER_OUTBOX).where(outbox.id.in_(done)).returning(outbox.id)
            )
            deleted = set(result.scalars())
        for message in batch.acknowledged:
            if message.kind is OutboxKind.ENQUEUE and message.id not in deleted:
                self._cancel_behind(session, message.job_id)
        for rejected in batch.rejected:
            self._give_up(session, rejected.message, rejected.reason)
        if batch.failure is not None:
            session.execute(
                update(WORKER_OUTBOX)
                .where(outbox.id == batch.failure.message.id)
                .values(attempts=outbox.attempts + 1, last_error=batch.failure.reason[:2000])
            )

    @staticmethod
    def _cancel_behind(session: Session, job_id: int) -> None:
        # The enqueue was withdrawn by a cancellation (or deletion) while it was on
        # its way: the worker API has the job now, so it must hear that it is
        # cancelled, its outputs discarded when the job is gone.
        exists = session.scalar(select(JOBS.c.id).where(JOBS.c.id == job_id)) is not None
        session.execute(
            insert(WORKER_OUTBOX).values(
                job_id=job_id,
                kind=OutboxKind.CANCEL.value,
                payload={"discard_outputs": not exists},
            )
        )
        note_written(session, NAME)
        logger.info("job %s: cancelled while being queued; cancel sent", job_id)

    @staticmethod
    def _give_up(session: Session, message: WorkerMessage, reason: str) -> None:
        logger.error(
            "job %s: %s rejected by the worker API: %s", message.job_id, message.kind, reason
        )
        if message.kind is OutboxKind.ENQUEUE:
            transition(
                session,
                message.job_id,
                JobStatus.ERROR,
                Outcome(failure=FailureKind.SYSTEM_ERROR),
                cause=Cause.QUEUE_REFUSED,
                runtime_details=f"could not be queued: {reason}",
            )

    # -- the HTTP side ---------------------------------------------------------------

    async def send(self, batch: Round[WorkerMessage]) -> None:
        for run in _runs(batch.claimed):
            if len(run) > 1 and await self._send_batch(run, batch):
                if batch.failure is not None:
                    return
                continue
            for message in run:
                delivery = await self._send_one(message)
                batch.record(delivery)
                if isinstance(delivery, Failed):
                    return

    async def _send_batch(self, run: list[WorkerMessage], batch: Round[WorkerMessage]) -> bool:
        """Enqueue ``run`` in one request; False when its jobs must go one by one
        (the worker API refused the batch, or has no batch route)."""
        if not self._batch_route:
            return False
        try:
            await self._client.enqueue_batch([message.payload or {} for message in run])
        except WorkerApiUnavailable as exc:
            batch.record(Failed(run[0], str(exc)))
            return True
        except WorkerApiRefused as exc:
            if exc.status_code in (404, 405):
                logger.info("the worker API has no POST /_jobs/batch; sending jobs one by one")
                self._batch_route = False
            # Else one of them is invalid: the single sends tell which.
            return False
        for message in run:
            batch.record(Acknowledged(message))
        logger.info(
            "%d jobs handed to the worker API (%s to %s)", len(run), run[0].job_id, run[-1].job_id
        )
        return True

    async def _send_one(self, message: WorkerMessage) -> Delivery[WorkerMessage]:
        try:
            if message.kind is OutboxKind.ENQUEUE:
                await self._client.enqueue(message.payload or {})
            else:
                discard = bool((message.payload or {}).get("discard_outputs"))
                await self._client.cancel(message.job_id, discard_outputs=discard)
        except WorkerApiUnavailable as exc:
            return Failed(message, str(exc))
        except WorkerApiRefused as exc:
            if exc.status_code not in _ALREADY_DONE:
                return Rejected(message, str(exc))
        logger.info("job %s: %s delivered to the worker API", message.job_id, message.kind)
        return Acknowledged(message)
