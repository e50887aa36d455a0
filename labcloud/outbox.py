"""Outboxes: messages written in the transaction of the change they announce, and
the relays that deliver them once that transaction has committed.

Whoever writes an outbox row calls ``note_written(session, name)`` in the same
transaction; when that session commits, every relay registered for ``name`` in
this process is woken (``register_waker``). A rolled-back transaction wakes
nobody, since its rows are gone. Relays in other processes see the rows on their
next poll. Routes therefore never wake a relay by hand.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import event
from sqlalchemy.orm import Session

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
