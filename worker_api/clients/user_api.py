"""Delivery of status changes to the user API (``PUT /_job_status``).

Rows of ``status_outbox`` are sent one at a time in id order, so the user API sees
each job's changes in the order they happened, and a row is deleted only once the
user API acknowledged it (2xx, or 404 for a job deleted there). Until then it stays:
the user API may be down for minutes, and this process may restart, without a
status being lost.

Several worker API processes on one PostgreSQL database: a process sends the first
row only while it holds that row's lock (``FOR UPDATE SKIP LOCKED``, kept through
the send until the row is deleted and committed); the others find the head locked
and wait. Delivery thus stays strictly sequential across processes, each row sent
by one process. A process that dies after the user API acknowledged a row but
before its deletion committed leaves the row to be sent again; the user API applies
statuses as guarded transitions, so that repeat is a no-op there.

SQLite serves one process: there a row is read, sent and deleted in separate
transactions, since a transaction held through the send would hold SQLite's write
lock (every pull and status report) for as long as the user API takes to answer.
"""

from __future__ import annotations

import logging

import anyio
import httpx
from sqlalchemy.orm import Session, sessionmaker

from labcloud.contract import INTERNAL_API_KEY_HEADER, StatusUpdate
from worker_api.queue.repository import QueueRepository
from worker_api.queue.service import Wakeup

logger = logging.getLogger(__name__)

_FIRST_RETRY_SECONDS = 0.1


class DeliveryFailed(Exception):
    """The user API did not acknowledge a status update."""


class StatusForwarder:
    """Sends the outbox to the user API until cancelled."""

    def __init__(
        self,
        *,
        factory: sessionmaker[Session],
        client: httpx.AsyncClient,
        user_api_url: str,
        api_key: str,
        wakeup: Wakeup,
        poll_seconds: float = 1.0,
        retry_max_seconds: float = 10.0,
    ) -> None:
        self._factory = factory
        self._client = client
        self._url = f"{user_api_url.rstrip('/')}/_job_status"
        self._api_key = api_key
        self._wakeup = wakeup
        self._poll_seconds = poll_seconds
        self._retry_max_seconds = retry_max_seconds

    async def run(self) -> None:
        """Deliver whatever is pending, then wait for a new row (woken at once by
        this process, polling for rows written by other processes); back off
        exponentially while the user API does not acknowledge."""
        backoff = 0.0
        while True:
            signal = self._wakeup.current
            try:
                await self.deliver_pending()
            except Exception as exc:
                backoff = min(max(backoff * 2, _FIRST_RETRY_SECONDS), self._retry_max_seconds)
                logger.warning("status delivery failed (%s); retrying in %.1f s", exc, backoff)
                await anyio.sleep(backoff)
                continue
            backoff = 0.0
            await self._wakeup.wait(signal, self._poll_seconds)

    async def deliver_pending(self) -> int:
        """Send rows until the outbox is empty (or another process is sending its
        first row); the number sent. Raises on the first row the user API does not
        acknowledge (it stays first in line)."""
        sent = 0
        while True:
            claim = await anyio.to_thread.run_sync(self._claim_first)
            if claim is None:
                return sent
            try:
                await self._send(claim.update)
            except BaseException:
                # Also when cancelled: the row's lock must not outlive the send.
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(claim.release)
                raise
            await anyio.to_thread.run_sync(claim.complete)
            sent += 1

    async def _send(self, update: StatusUpdate) -> None:
        try:
            response = await self._client.put(
                self._url,
                json=update.model_dump(mode="json"),
                headers={INTERNAL_API_KEY_HEADER: self._api_key},
            )
        except httpx.HTTPError as exc:
            raise DeliveryFailed(f"cannot reach the user API: {exc!r}") from exc
        if response.is_success or response.status_code == 404:
            # 404: the job was deleted on the user API; nothing left to update.
            return
        raise DeliveryFailed(
            f"the user API answered {response.status_code} to the status of job {update.job_id}"
        )

    def _claim_first(self) -> _Claim | None:
        session = self._factory()
        try:
            session.begin()
            repository = QueueRepository(session)
            locking = session.get_bind().dialect.name == "postgresql"
            row = repository.claim_first_in_outbox() if locking else repository.first_in_outbox()
            if row is None:
                session.close()
                return None
            update = StatusUpdate(
                job_id=row.job_id, status=row.status, runtime_details=row.runtime_details
            )
            if not locking:
                session.commit()
            return _Claim(session, row.id, update, locked=locking)
        except BaseException:
            session.close()
            raise


class _Claim:
    """The outbox row being sent. On PostgreSQL its transaction stays open, holding
    the row's lock, until ``complete`` deletes the row or ``release`` lets it go."""

    def __init__(self, session: Session, outbox_id: int, update: StatusUpdate, *, locked: bool):
        self.update = update
        self._session = session
        self._outbox_id = outbox_id
        self._locked = locked

    def complete(self) -> None:
        """Delete the acknowledged row and end the claim."""
        try:
            if not self._locked:
                self._session.begin()
            QueueRepository(self._session).remove_from_outbox(self._outbox_id)
            self._session.commit()
        finally:
            self._session.close()

    def release(self) -> None:
        """Leave the row in the outbox, first in line, and end the claim."""
        self._session.close()
