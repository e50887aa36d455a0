"""Delivery of the worker outbox (new jobs, cancellations) to the worker API.

Messages are committed with the change they announce and deleted only once the
worker API acknowledged them, so a job submitted while the worker API is down is
delivered when it comes back. Delivery is strictly in outbox order, which keeps a
cancellation behind the enqueue it cancels. Both worker API routes are idempotent,
so a message delivered twice (after a crash between sending and deleting) is harmless.

The outbox is read in rounds of up to ``BATCH_SIZE`` messages, and consecutive
enqueues go out as one ``POST /_jobs/batch``: under a burst of submissions, one
request and two statements per round instead of per job. With several user API
processes on PostgreSQL, a round holds a transaction-scoped advisory lock from
reading its batch to deleting it, so one process delivers at a time and order
holds; a process that finds the lock taken leaves the rows to the holder, which
reads again before it stops. (SQLite deployments are one process: a round there
must not keep its transaction open while sending, since SQLite transactions hold
the database's write lock.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from labcloud.contract import INTERNAL_API_KEY_HEADER, JobStatus
from labcloud.threads import run_to_completion
from user_api.jobs import repository
from user_api.models import OutboxKind
from user_api.notifications.service import enqueue_completion_email

logger = logging.getLogger(__name__)

# Messages read per round, and the most enqueues sent in one request (the worker
# API accepts up to 500).
BATCH_SIZE = 200


@dataclass(frozen=True, slots=True)
class _Message:
    id: int
    job_id: int
    kind: OutboxKind
    payload: dict[str, Any] | None


@dataclass(slots=True)
class _Outcome:
    """What one round achieved, recorded even when sending stopped half-way."""

    acknowledged: list[_Message] = field(default_factory=list)
    rejected: list[tuple[_Message, str]] = field(default_factory=list)
    failure: tuple[_Message, str] | None = None

    @property
    def settled(self) -> list[_Message]:
        return self.acknowledged + [message for message, _ in self.rejected]


class _Rejected(Exception):
    """The worker API refused the message for good (a 4xx other than 404/409)."""


class _Transient(Exception):
    """The worker API could not take the message now; it is kept and retried."""


def _runs(messages: Sequence[_Message]) -> Iterator[list[_Message]]:
    """Consecutive enqueues together, every cancellation on its own (order kept)."""
    run: list[_Message] = []
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
        batch_size: int = BATCH_SIZE,
    ) -> None:
        self._sessions = session_factory
        self._client = client
        self._headers = {INTERNAL_API_KEY_HEADER: internal_key}
        self._poll = poll_seconds
        self._max_backoff = max_backoff_seconds
        self._batch_size = batch_size
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Cleared when the worker API predates POST /_jobs/batch: one job per request.
        self._batch_route = True
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
            except (httpx.HTTPError, _Transient, SQLAlchemyError) as exc:
                backoff = min(max(backoff * 2, 0.2), self._max_backoff)
                what = "database" if isinstance(exc, SQLAlchemyError) else "worker API"
                logger.warning(
                    "%s unavailable (%s); retrying in %.1f s", what, str(exc)[:300], backoff
                )
                await asyncio.sleep(backoff)
                continue
            with anyio.move_on_after(self._poll):
                await self._wake.wait()

    async def _deliver_pending(self) -> bool:
        """Deliver rounds until the outbox is empty (or another process holds the
        delivery lock); True when anything was delivered."""
        delivered = False
        while True:
            # The session is used from one thread at a time: each step runs to
            # completion even when the task is cancelled (the API shutting down).
            session = self._sessions()
            try:
                messages = await run_to_completion(self._claim, session)
                if not messages:
                    return delivered
                outcome = _Outcome()
                try:
                    await self._send_all(messages, outcome)
                finally:
                    await run_to_completion(self._settle, session, outcome)
            finally:
                await run_to_completion(session.close)
            delivered = True
            self.delivered += len(outcome.settled)

    # -- the database side of a round (run in a worker thread) ----------------------

    def _claim(self, session: Session) -> list[_Message]:
        session.begin()
        if not repository.lock_outbox_delivery(session):
            session.rollback()
            return []
        messages = [
            _Message(row.id, row.job_id, OutboxKind(row.kind), row.payload)
            for row in repository.outbox_batch(session, self._batch_size)
        ]
        if not messages or not repository.holds_lock_while_sending(session):
            session.commit()
        return messages

    def _settle(self, session: Session, outcome: _Outcome) -> None:
        if not session.in_transaction():
            session.begin()
        try:
            self._record(session, outcome)
        except BaseException:
            session.rollback()
            raise
        session.commit()

    def _record(self, session: Session, outcome: _Outcome) -> None:
        settled = outcome.settled
        deleted = repository.acknowledge_outbox(session, [message.id for message in settled])
        for message in outcome.acknowledged:
            if message.kind is OutboxKind.ENQUEUE and message.id not in deleted:
                # Withdrawn by a cancellation (or deletion) while it was on its way:
                # the worker API has the job now, so it must hear that it is cancelled.
                job = repository.get(session, message.job_id)
                repository.add_outbox(
                    session, message.job_id, OutboxKind.CANCEL, {"discard_outputs": job is None}
                )
                logger.info("job %s: cancelled while being queued; cancel sent", message.job_id)
        for message, reason in outcome.rejected:
            self._give_up(session, message, reason)
        if outcome.failure is not None:
            message, error = outcome.failure
            repository.record_outbox_failure(session, message.id, error)

    @staticmethod
    def _give_up(session: Session, message: _Message, reason: str) -> None:
        logger.error(
            "job %s: %s rejected by the worker API: %s", message.job_id, message.kind, reason
        )
        if message.kind is OutboxKind.ENQUEUE and repository.transition(
            session, message.job_id, JobStatus.ERROR, f"could not be queued: {reason}"
        ):
            job = repository.get(session, message.job_id)
            if job is not None:
                enqueue_completion_email(session, job)

    # -- the HTTP side ---------------------------------------------------------------

    async def _send_all(self, messages: Sequence[_Message], outcome: _Outcome) -> None:
        for run in _runs(messages):
            if len(run) > 1 and await self._send_batch(run, outcome):
                continue
            for message in run:
                try:
                    await self._send(message)
                except _Rejected as exc:
                    outcome.rejected.append((message, str(exc)))
                except (_Transient, httpx.HTTPError) as exc:
                    outcome.failure = (message, str(exc))
                    raise
                else:
                    outcome.acknowledged.append(message)

    async def _send_batch(self, run: list[_Message], outcome: _Outcome) -> bool:
        """Enqueue ``run`` in one request; False when its jobs must go one by one
        (one of them is invalid, or the worker API has no batch route)."""
        if not self._batch_route:
            return False
        try:
            response = await self._client.post(
                "/_jobs/batch", json=[message.payload for message in run], headers=self._headers
            )
        except httpx.HTTPError as exc:
            outcome.failure = (run[0], str(exc))
            raise
        if response.is_success:
            outcome.acknowledged.extend(run)
            logger.info(
                "%d jobs handed to the worker API (%s to %s)",
                len(run),
                run[0].job_id,
                run[-1].job_id,
            )
            return True
        if response.status_code in (404, 405):
            logger.info("the worker API has no POST /_jobs/batch; sending jobs one by one")
            self._batch_route = False
            return False
        if response.status_code == 422:
            return False  # one of them is invalid: the single sends tell which
        error = _Transient(f"worker API answered {response.status_code}: {response.text[:300]}")
        outcome.failure = (run[0], str(error))
        raise error

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
            raise _Transient(f"worker API answered {response.status_code}: {response.text[:300]}")
        raise _Rejected(f"worker API refused the job ({response.status_code}): {response.text}")
