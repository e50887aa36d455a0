"""Waiting for a job's status to change: ``GET /jobs/{id}?wait=SECONDS``.

A client following an hour-long job asks once and gets the answer as soon as the
status moves, instead of polling in a loop. The wait holds no database connection
and no thread: the request reads the job in a short transaction, then sleeps on
an event until one of two things happens, and reads again:

- this process committed a status change of the job (``lifecycle.transition``
  calls ``note_status_changed``; the waiters are woken after the commit);
- ``JOB_WAIT_POLL_SECONDS`` passed: the change may have been committed by another
  server process (``--workers N``), which cannot wake this one.

So a change is seen at once when the status update lands on the same process, and
within the poll interval otherwise. One registry serves the process (status
updates and waiting requests meet there whatever app instance they come through);
the number of requests waiting at once is capped per process.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

from sqlalchemy.orm import Session

from labcloud.db import after_commit
from labcloud.errors import Unavailable


class TooManyWaiting(Unavailable):
    """Too many requests wait for jobs on this server; ask again without ``wait``
    or later."""


class JobWatch:
    """Requests waiting for jobs' status changes, woken from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[int, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._count = 0

    @property
    def waiting(self) -> int:
        """Requests waiting now."""
        with self._lock:
            return self._count

    @contextmanager
    def watching(self, job_id: int, *, max_waiting: int) -> Iterator[asyncio.Event]:
        """An event set when a status change of ``job_id`` is committed in this
        process, for the duration of the block. Raises ``TooManyWaiting`` when
        ``max_waiting`` requests wait already. Call it on the event loop."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            if self._count >= max_waiting:
                raise TooManyWaiting(
                    f"{max_waiting} requests already wait for jobs on this server: "
                    "ask again without wait, or later"
                )
            self._count += 1
            self._waiters.setdefault(job_id, set()).add(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:
                self._count -= 1
                waiters = self._waiters.get(job_id)
                if waiters is not None:
                    waiters.discard(entry)
                    if not waiters:
                        del self._waiters[job_id]

    def changed(self, job_id: int) -> None:
        """Wake the requests waiting for ``job_id`` (from any thread)."""
        with self._lock:
            waiters = list(self._waiters.get(job_id, ()))
        for loop, event in waiters:
            # A loop that closed meanwhile has no waiter left to wake.
            if not loop.is_closed():
                loop.call_soon_threadsafe(event.set)


JOB_WATCH = JobWatch()


def note_status_changed(session: Session, job_id: int) -> None:
    """Wake the requests waiting for ``job_id`` once the current unit of work of
    ``session`` commits (never if it rolls back)."""
    after_commit(session, partial(JOB_WATCH.changed, job_id))
