"""Delivery of the worker outbox (new jobs, cancellations) to the worker API.

Messages are committed with the change they announce and deleted only once the
worker API acknowledged them, so a job submitted while the worker API is down is
delivered when it comes back. Delivery is strictly in outbox order, which keeps a
cancellation behind the enqueue it cancels. Both worker API routes are idempotent,
so a message delivered twice (after a crash between sending and deleting) is harmless.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
from sqlalchemy.orm import Session, sessionmaker

from labcloud.contract import INTERNAL_API_KEY_HEADER, JobStatus
from labcloud.db import unit_of_work
from user_api.jobs import repository
from user_api.models import OutboxKind
from user_api.notifications.service import enqueue_completion_email

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Message:
    id: int
    job_id: int
    kind: OutboxKind
    payload: dict[str, Any] | None


class _Rejected(Exception):
    """The worker API refused the message for good (a 4xx other than 404/409)."""


class WorkerApiForwarder:
    """Background task sending outbox rows; ``wake()`` after a commit that wrote one."""

    def __init__(
        self,
        *,
        session_factory: sessionmaker[Session],
        client: httpx.AsyncClient,
        internal_key: str,
        poll_seconds: float = 1.0,
        max_backoff_seconds: float = 10.0,
    ) -> None:
        self._sessions = session_factory
        self._client = client
        self._headers = {INTERNAL_API_KEY_HEADER: internal_key}
        self._poll = poll_seconds
        self._max_backoff = max_backoff_seconds
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.delivered = 0

    def wake(self) -> None:
        # Called from worker threads (sync endpoints) as well as the loop.
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        """Deliver forever (until cancelled)."""
        self._loop = asyncio.get_running_loop()
        backoff = 0.0
        while True:
            self._wake.clear()
            try:
                delivered_any = await self._deliver_pending()
                backoff = 0.0
                if delivered_any:
                    continue
            except httpx.HTTPError as exc:
                backoff = min(max(backoff * 2, 0.2), self._max_backoff)
                logger.warning("worker API unreachable (%s); retrying in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                continue
            with anyio.move_on_after(self._poll):
                await self._wake.wait()

    async def _deliver_pending(self) -> bool:
        delivered = False
        while True:
            message = await anyio.to_thread.run_sync(self._next)
            if message is None:
                return delivered
            try:
                await self._send(message)
            except _Rejected as exc:
                await anyio.to_thread.run_sync(self._give_up, message, str(exc))
            else:
                await anyio.to_thread.run_sync(self._acknowledge, message.id)
            delivered = True
            self.delivered += 1

    async def _send(self, message: _Message) -> None:
        if message.kind is OutboxKind.ENQUEUE:
            response = await self._client.post(
                "/_jobs", json=message.payload, headers=self._headers
            )
        else:
            discard = bool((message.payload or {}).get("discard_outputs"))
            response = await self._client.delete(
                f"/_jobs/{message.job_id}",
                params={"discard_outputs": str(discard).lower()},
                headers=self._headers,
            )
        if response.is_success or response.status_code in (404, 409):
            logger.info("job %s: %s delivered to the worker API", message.job_id, message.kind)
            return
        if response.status_code >= 500 or response.status_code in (401, 403, 408, 429):
            # Transient (or a key being rotated): keep the message and retry.
            raise httpx.HTTPStatusError(
                f"worker API answered {response.status_code}: {response.text[:300]}",
                request=response.request,
                response=response,
            )
        raise _Rejected(f"worker API refused the job ({response.status_code}): {response.text}")

    def _next(self) -> _Message | None:
        with unit_of_work(self._sessions) as session:
            row = repository.next_outbox(session)
            if row is None:
                return None
            return _Message(row.id, row.job_id, OutboxKind(row.kind), row.payload)

    def _acknowledge(self, outbox_id: int) -> None:
        with unit_of_work(self._sessions) as session:
            repository.acknowledge_outbox(session, outbox_id)

    def _give_up(self, message: _Message, reason: str) -> None:
        logger.error(
            "job %s: %s rejected by the worker API: %s", message.job_id, message.kind, reason
        )
        with unit_of_work(self._sessions) as session:
            repository.acknowledge_outbox(session, message.id)
            if message.kind is OutboxKind.ENQUEUE and repository.transition(
                session, message.job_id, JobStatus.ERROR, f"could not be queued: {reason}"
            ):
                job = repository.get(session, message.job_id)
                if job is not None:
                    enqueue_completion_email(session, job)
