"""Outboxes: messages written in the transaction of the change they announce, and
the relays that deliver them once that transaction has committed.

Whoever writes an outbox row calls ``note_written(session, name)`` in the same
transaction; when that session commits, every relay registered for ``name`` in
this process is woken (``register_waker``). A rolled-back transaction wakes
nobody, since its rows are gone. Relays in other processes see the rows on their
next poll. Routes therefore never wake a relay by hand.

``Relay`` is the one delivery engine: claim a batch, send it, settle it, back off
while the receiver fails, wake on commit, keep the order across processes. Each
outbox brings what is its own (``Outbox``): its SQL, its receiver and what a
refusal means; the adapters live in their domains (``user_api.jobs.outbox``,
``worker_api.queue.status_relay``, ``user_api.notifications.sender``).

A message is delivered at least once: one acknowledged by the receiver but not yet
recorded when its process dies is sent again, so receivers treat repeats as no-ops.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from sqlalchemy import event, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from labcloud.threads import run_to_the_end

logger = logging.getLogger(__name__)

# Key in ``Session.info`` of the outbox names written in the current transaction.
_WRITTEN = "labcloud.outbox.written"

_lock = threading.Lock()
_wakers: dict[str, list[Callable[[], None]]] = {}


def note_written(session: Session, outbox: str) -> None:
    """Record that the current transaction of ``session`` wrote to ``outbox``."""
    written: set[str] = session.info.setdefault(_WRITTEN, set())
    written.add(outbox)


def register_waker(outbox: str, wake: Callable[[], None]) -> Callable[[], None]:
    """Call ``wake`` after each commit that wrote to ``outbox`` (from the committing
    thread: it must be thread-safe and quick). Returns the function that unregisters it."""
    with _lock:
        _wakers.setdefault(outbox, []).append(wake)

    def unregister() -> None:
        with _lock:
            callbacks = _wakers.get(outbox, [])
            if wake in callbacks:
                callbacks.remove(wake)

    return unregister


@event.listens_for(Session, "after_commit")
def _wake_after_commit(session: Session) -> None:
    written: set[str] | None = session.info.pop(_WRITTEN, None)
    if not written:
        return
    with _lock:
        callbacks = [wake for name in written for wake in _wakers.get(name, ())]
    for wake in callbacks:
        try:
            wake()
        except Exception:  # a relay's wake-up must never fail the committed request
            logger.exception("waking an outbox relay failed")


@event.listens_for(Session, "after_rollback")
def _forget_after_rollback(session: Session) -> None:
    session.info.pop(_WRITTEN, None)


# -- the relay engine ------------------------------------------------------------------

M = TypeVar("M")


@dataclass(frozen=True, slots=True)
class Acknowledged(Generic[M]):
    """The receiver took the message: it leaves the outbox."""

    message: M


@dataclass(frozen=True, slots=True)
class Rejected(Generic[M]):
    """The receiver refused the message for good (trying again cannot help): it
    leaves the outbox, and the outbox records what follows from the refusal."""

    message: M
    reason: str


@dataclass(frozen=True, slots=True)
class Failed(Generic[M]):
    """The message could not be delivered now (receiver down or busy): it stays,
    and the round stops there, so that nothing written after it overtakes it."""

    message: M
    reason: str
    # Seconds the receiver asked to be left alone (``Retry-After``), when it said so.
    retry_after: float | None = None


Delivery = Acknowledged[M] | Rejected[M] | Failed[M]


class Round(Generic[M]):
    """The messages claimed in one round and what became of each, recorded while
    sending goes on: what was delivered before a failure or a cancellation is
    settled with the rest (``unsent``: claimed, not tried)."""

    def __init__(self, claimed: Sequence[M]) -> None:
        self.claimed: list[M] = list(claimed)
        self.acknowledged: list[M] = []
        self.rejected: list[Rejected[M]] = []
        self.failure: Failed[M] | None = None

    def record(self, delivery: Delivery[M]) -> None:
        if self.failure is not None:
            raise RuntimeError("a round ends at its first failure")
        if isinstance(delivery, Acknowledged):
            self.acknowledged.append(delivery.message)
        elif isinstance(delivery, Rejected):
            self.rejected.append(delivery)
        else:
            self.failure = delivery

    @property
    def settled(self) -> int:
        """Messages that leave the outbox (acknowledged or rejected)."""
        return len(self.acknowledged) + len(self.rejected)

    @property
    def unsent(self) -> list[M]:
        tried = {id(message) for message in self.acknowledged}
        tried.update(id(rejected.message) for rejected in self.rejected)
        if self.failure is not None:
            tried.add(id(self.failure.message))
        return [message for message in self.claimed if id(message) not in tried]


class Outbox(Protocol[M]):
    """One outbox's side of its relay: which messages, how they travel, and what
    delivering them changes. ``claim`` and ``settle`` are blocking (they run in a
    worker thread, in the transaction the relay opened); ``send`` is async."""

    @property
    def name(self) -> str:
        """The outbox's name: its writers' ``note_written`` and its lock."""
        ...

    def claim(self, session: Session) -> Sequence[M]:
        """The next messages in delivery order (at most one batch); none when empty."""
        ...

    async def send(self, batch: Round[M]) -> None:
        """Send ``batch.claimed`` in order, recording each delivery in ``batch`` as it
        is known; return after the first ``Failed``."""
        ...

    def settle(self, session: Session, batch: Round[M]) -> None:
        """Record ``batch``'s outcome (acknowledged and rejected messages leave the
        outbox, a failure is noted) and let go of its ``unsent`` messages."""
        ...


class DeliveryFailed(Exception):
    """A message could not be delivered now; it stays first in line."""

    def __init__(self, failure: Failed[Any]) -> None:
        super().__init__(failure.reason)
        self.failure = failure


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential back-off while deliveries fail: ``first_seconds``, doubling up to
    ``max_seconds``; at least what the receiver asked for, within the cap."""

    first_seconds: float = 0.1
    max_seconds: float = 10.0

    def after(self, previous: float, retry_after: float | None = None) -> float:
        delay = min(max(previous * 2, self.first_seconds), self.max_seconds)
        if retry_after is not None:
            delay = min(max(delay, retry_after), self.max_seconds)
        return delay


def advisory_lock_key(outbox: str) -> int:
    """The PostgreSQL advisory lock (a signed 64-bit key) of ``outbox``'s relays."""
    digest = hashlib.sha256(f"labcloud.outbox:{outbox}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Relay(Generic[M]):
    """Delivers one outbox until cancelled.

    A round claims a batch, sends it and settles it. On PostgreSQL the round is
    one transaction holding an advisory lock keyed by the outbox's name from the
    claim through the send to the settlement: relays of several processes deliver
    one at a time, so the order holds across processes, and a process that dies
    mid-round leaves its messages (rolled back) to the next. A relay that finds the
    lock taken leaves the rows to the holder, which claims again before it rests.
    SQLite serves one process, and its transactions hold the database's write lock:
    there the claim, the send and the settlement are separate short transactions.

    Between rounds it waits for a commit of this process that wrote to the outbox
    (``note_written``), or ``poll_seconds`` for rows written by other processes.
    While deliveries fail it backs off (``Backoff``). A cancellation (the process
    stopping) waits for the database step under way and settles what the round
    achieved, so no claim is left half-recorded.
    """

    def __init__(
        self,
        outbox: Outbox[M],
        sessions: sessionmaker[Session],
        *,
        poll_seconds: float,
        backoff: Backoff,
    ) -> None:
        self.outbox = outbox
        self._sessions = sessions
        self._poll = poll_seconds
        self._backoff = backoff
        self._lock_key = advisory_lock_key(outbox.name)
        self.settled = 0

    async def run(self) -> None:
        """Deliver until cancelled: at once when woken, else every ``poll_seconds``."""
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()

        def wake() -> None:  # called from committing threads
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(woken.set)

        unregister = register_waker(self.outbox.name, wake)
        delay = 0.0
        try:
            while True:
                woken.clear()  # a commit from now on calls for another pass
                try:
                    await self.deliver_pending()
                except DeliveryFailed as exc:
                    delay = self._backoff.after(delay, exc.failure.retry_after)
                    logger.warning(
                        "%s: %s; retrying in %.1f s", self.outbox.name, exc.failure.reason, delay
                    )
                except SQLAlchemyError as exc:
                    delay = self._backoff.after(delay)
                    logger.warning(
                        "%s: database unavailable (%s); retrying in %.1f s",
                        self.outbox.name,
                        str(exc)[:300],
                        delay,
                    )
                except Exception:  # the relay must outlive any one bad round
                    delay = self._backoff.after(delay)
                    logger.exception(
                        "%s: delivery failed; retrying in %.1f s", self.outbox.name, delay
                    )
                else:
                    delay = 0.0
                    await _wait(woken, self._poll)
                    continue
                await asyncio.sleep(delay)
        finally:
            unregister()

    async def deliver_pending(self) -> int:
        """Deliver rounds until the outbox is empty (or another process holds its
        lock); the number of messages settled. Raises ``DeliveryFailed`` at the
        first message that could not be delivered (it stays first in line)."""
        settled = 0
        while True:
            batch = await self._round()
            if batch is None:
                return settled
            settled += batch.settled
            self.settled += batch.settled
            if batch.failure is not None:
                raise DeliveryFailed(batch.failure)
            if not batch.settled:
                raise RuntimeError(f"{self.outbox.name}: a round sent none of its messages")

    async def _round(self) -> Round[M] | None:
        session = self._sessions()
        try:
            batch, cancelled = await self._claim_send_settle(session)
        except BaseException as exc:
            _, stopping = await run_to_the_end(session.close)
            if stopping is not None and not isinstance(exc, asyncio.CancelledError):
                raise stopping from exc  # stopping wins over a failed round
            raise
        _, stopping = await run_to_the_end(session.close)
        cancelled = cancelled or stopping
        if cancelled is not None:
            raise cancelled
        return batch

    async def _claim_send_settle(
        self, session: Session
    ) -> tuple[Round[M] | None, asyncio.CancelledError | None]:
        """One round; the cancellation that arrived meanwhile is returned, to be
        raised once the session is closed."""
        claimed, cancelled = await run_to_the_end(self._claim, session)
        if not claimed:
            return None, cancelled
        batch = Round(claimed)
        if cancelled is None:
            try:
                await self.outbox.send(batch)
            except asyncio.CancelledError as exc:
                cancelled = exc
            except Exception as exc:  # an adapter's bug: keep the order, retry later
                logger.exception("%s: sending failed", self.outbox.name)
                if batch.failure is None and batch.unsent:
                    batch.record(Failed(batch.unsent[0], f"{type(exc).__name__}: {exc}"))
        _, stopping = await run_to_the_end(self._settle, session, batch)
        return batch, cancelled or stopping

    # -- the database side of a round (in a worker thread) ---------------------------

    def _holds_lock_while_sending(self, session: Session) -> bool:
        return session.get_bind().dialect.name == "postgresql"

    def _claim(self, session: Session) -> Sequence[M]:
        session.begin()
        try:
            locking = self._holds_lock_while_sending(session)
            if locking and not session.scalar(
                select(func.pg_try_advisory_xact_lock(self._lock_key))
            ):
                session.rollback()
                return []
            messages = self.outbox.claim(session)
            if not messages or not locking:
                session.commit()
            return messages
        except BaseException:
            session.rollback()
            raise

    def _settle(self, session: Session, batch: Round[M]) -> None:
        if not session.in_transaction():
            session.begin()
        try:
            self.outbox.settle(session, batch)
        except BaseException:
            session.rollback()
            raise
        session.commit()


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Wait until ``event`` is set, at most ``seconds``. (No timeout context: one
    expiring just as the task is cancelled could swallow the cancellation.)"""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait((waiter,), timeout=seconds)
    finally:
        waiter.cancel()
