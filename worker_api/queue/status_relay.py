"""The status outbox: status changes of jobs for the user API (``PUT
/_job_status``), delivered by the outbox relay (``labcloud.outbox.Relay``) under
the name ``status_outbox``.

Rows are written by the lifecycle (``worker_api.queue.lifecycle``) in the
transaction of the change, and sent in id order, so the user API sees each job's
changes in the order they happened; the relay's lock keeps that order across
worker API processes. A row is deleted only once the user API acknowledged it
(2xx, or 404 for a job deleted there). Until then it stays: the user API may be
down for minutes, and this process may restart, without a status being lost. A
row acknowledged but not yet deleted when its process dies is sent again; the user
API applies statuses as guarded transitions, so that repeat is a no-op there.

Any other refusal keeps the row first in line and is retried with back-off: a
status is never dropped, and a user API that refuses well-formed updates (an
older version, a wrong key) is a deployment to fix, after which delivery resumes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from labcloud.contract import Outcome, StatusUpdate
from labcloud.outbox import Acknowledged, Failed, Round
from worker_api.clients.user_api import UserApiClient, UserApiRefused, UserApiUnavailable
from worker_api.models import StatusOutbox
from worker_api.queue.lifecycle import STATUS_OUTBOX

logger = logging.getLogger(__name__)

# Rows read per round; each is still sent on its own, in order.
BATCH_SIZE = 100


@dataclass(frozen=True, slots=True)
class StatusMessage:
    id: int
    update: StatusUpdate


class UserApiStatusOutbox:
    """The status outbox's side of its relay (``labcloud.outbox.Outbox``)."""

    name = STATUS_OUTBOX

    def __init__(self, client: UserApiClient, *, batch_size: int = BATCH_SIZE) -> None:
        self._client = client
        self._batch_size = batch_size

    def claim(self, session: Session) -> list[StatusMessage]:
        """The oldest rows, in the order the changes happened."""
        rows = session.execute(
            select(
                StatusOutbox.id,
                StatusOutbox.job_id,
                StatusOutbox.status,
                StatusOutbox.runtime_details,
                StatusOutbox.outcome,
            )
            .order_by(StatusOutbox.id)
            .limit(self._batch_size)
        )
        return [
            StatusMessage(
                row.id,
                StatusUpdate(
                    job_id=row.job_id,
                    status=row.status,
                    runtime_details=row.runtime_details,
                    outcome=Outcome.model_validate(row.outcome) if row.outcome else None,
                ),
            )
            for row in rows
        ]

    async def send(self, batch: Round[StatusMessage]) -> None:
        for message in batch.claimed:
            try:
                await self._client.put_status(message.update)
            except UserApiUnavailable as exc:
                batch.record(Failed(message, str(exc)))
                return
            except UserApiRefused as exc:
                if exc.status_code != 404:  # 404: the job was deleted there; nothing to tell
                    logger.error("status of job %s refused: %s", message.update.job_id, exc)
                    batch.record(Failed(message, str(exc)))
                    return
            batch.record(Acknowledged(message))

    def settle(self, session: Session, batch: Round[StatusMessage]) -> None:
        delivered = [message.id for message in batch.acknowledged]
        if delivered:
            session.execute(delete(StatusOutbox).where(StatusOutbox.id.in_(delivered)))
