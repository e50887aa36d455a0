"""Connected workers: each pull records the worker's offer, each keep-alive that it
is still there, in the ``connected_workers`` table that every worker API process
shares.

A worker pulls every few seconds (a long-poll of at most MAX_WAIT_SECONDS) and
sends a keep-alive per job every TIMEOUT_STATUS seconds, so writing on every call
would add a statement to the hottest routes. ``WorkerPresence`` writes at most once
every ``record_every_seconds`` per worker and process, and at once when the
worker's offer changed: one upsert (pull) or one update (keep-alive) by primary
key. A worker is *connected* while it was seen within ``seen_window_seconds``
(by default twice the longest long-poll plus a margin, so a worker that waits in a
long-poll or is busy with long jobs, sending only keep-alives, stays connected).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import anyio.to_thread
from sqlalchemy import ColumnElement, SQLColumnExpression, case, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from labcloud.db import unit_of_work, utcnow
from worker_api.models import ConnectedWorker
from worker_api.queue.schemas import WorkerOffer

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Recorded:
    """What this process last wrote for a worker, and when (monotonic seconds)."""

    at: float
    offer: WorkerOffer | None
    older_than: float | None
    groups: tuple[str, ...]


class WorkerPresence:
    """Records pulls and keep-alives, throttled per worker (see the module
    docstring); thread-safe (keep-alives are handled in the thread pool)."""

    def __init__(
        self,
        factory: sessionmaker[Session] | None,
        *,
        seen_window_seconds: float,
        record_every_seconds: float,
    ) -> None:
        self.factory = factory
        self.seen_window_seconds = seen_window_seconds
        self.record_every_seconds = record_every_seconds
        self._recorded: dict[str, _Recorded] = {}
        self._lock = threading.Lock()

    def _due(self, name: str, offer: WorkerOffer | None, **changes: object) -> bool:
        """Whether a write for ``name`` is due; marks it written when it is."""
        now = time.monotonic()
        with self._lock:
            last = self._recorded.get(name)
            if offer is None:  # a keep-alive: only time matters
                if last is not None and now - last.at < self.record_every_seconds:
                    return False
                if last is None:
                    self._recorded[name] = _Recorded(now, None, None, ())
                else:
                    self._recorded[name] = _Recorded(now, last.offer, last.older_than, last.groups)
                return True
            older_than = changes["older_than"]
            groups = changes["groups"]
            assert isinstance(older_than, float) and isinstance(groups, tuple)
            if (
                last is not None
                and last.offer == offer
                and last.older_than == older_than
                and last.groups == groups
                and now - last.at < self.record_every_seconds
            ):
                return False
            self._recorded[name] = _Recorded(now, offer, older_than, groups)
            return True

    def _forget(self, name: str) -> None:
        with self._lock:
            self._recorded.pop(name, None)

    async def pulled(
        self, offer: WorkerOffer, *, groups: Collection[str], older_than: float
    ) -> None:
        """A pull with this offer: upserts the worker's row when due. A failure is
        logged, never the pull's: the queue matters more than the list of workers."""
        ordered = tuple(sorted(set(groups)))
        if self.factory is None or not self._due(
            offer.name, offer, older_than=float(older_than), groups=ordered
        ):
            return
        factory = self.factory

        def write() -> None:
            with unit_of_work(factory) as session:
                record_pull(
                    session,
                    offer,
                    groups=ordered,
                    older_than=float(older_than),
                    now=utcnow(),
                    window_seconds=self.seen_window_seconds,
                )

        try:
            await anyio.to_thread.run_sync(write)
        except SQLAlchemyError:
            self._forget(offer.name)
            logger.warning("could not record the pull of worker %s", offer.name, exc_info=True)

    def kept_alive(self, session: Session, name: str) -> None:
        """A keep-alive or status report of ``name``, in the caller's transaction."""
        if self._due(name, None):
            touch(session, name, now=utcnow())

    def connected_since(self, now: datetime) -> datetime:
        """The oldest ``last_seen_at`` of a connected worker."""
        return now - timedelta(seconds=self.seen_window_seconds)


def _greatest(
    dialect: str, left: SQLColumnExpression[int], right: ColumnElement[int]
) -> ColumnElement[int]:
    if dialect == "postgresql":
        return func.greatest(left, right)
    return func.max(left, right)  # SQLite's scalar max of its arguments


def record_pull(
    session: Session,
    offer: WorkerOffer,
    *,
    groups: Sequence[str],
    older_than: float,
    now: datetime,
    window_seconds: float,
) -> None:
    """Upsert the worker's row with this pull's offer. The ``peak_*`` columns keep
    the largest offer since the worker connected: a worker seen last before the
    window starts again from this offer."""
    dialect = session.get_bind().dialect.name
    dialect_insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    values = {
        "name": offer.name,
        "environment": offer.environment.value,
        "groups": list(groups),
        "memory": offer.memory,
        "cpu_cores": offer.cpu_cores,
        "gpus": offer.gpus,
        "gpu_mem": offer.gpu_mem,
        "gpu_model": offer.gpu_model,
        "gpu_archi": offer.gpu_archi,
        "peak_memory": offer.memory,
        "peak_cpu_cores": offer.cpu_cores,
        "peak_gpus": offer.gpus,
        "peak_gpu_mem": offer.gpu_mem,
        "older_than": older_than,
        "connected_at": now,
        "last_pull_at": now,
        "last_seen_at": now,
    }
    statement = dialect_insert(ConnectedWorker).values(values)
    new = statement.excluded
    row = ConnectedWorker
    returned = row.last_seen_at < now - timedelta(seconds=window_seconds)

    def peak(column: SQLColumnExpression[int], offered: ColumnElement[int]) -> ColumnElement[int]:
        return case((returned, offered), else_=_greatest(dialect, column, offered))

    def known(
        column: SQLColumnExpression[str | None], offered: ColumnElement[str | None]
    ) -> ColumnElement[str | None]:
        # A worker whose GPUs are all busy may not say their model: keep what it said.
        return case((returned, offered), else_=func.coalesce(offered, column))

    session.execute(
        statement.on_conflict_do_update(
            index_elements=[row.name],
            set_={
                "environment": new.environment,
                "groups": new.groups,
                "memory": new.memory,
                "cpu_cores": new.cpu_cores,
                "gpus": new.gpus,
                "gpu_mem": new.gpu_mem,
                "gpu_model": known(row.gpu_model, new.gpu_model),
                "gpu_archi": known(row.gpu_archi, new.gpu_archi),
                "peak_memory": peak(row.peak_memory, new.memory),
                "peak_cpu_cores": peak(row.peak_cpu_cores, new.cpu_cores),
                "peak_gpus": peak(row.peak_gpus, new.gpus),
                "peak_gpu_mem": peak(row.peak_gpu_mem, new.gpu_mem),
                "older_than": new.older_than,
                "connected_at": case((returned, new.connected_at), else_=row.connected_at),
                "last_pull_at": new.last_pull_at,
                "last_seen_at": new.last_seen_at,
            },
        )
    )


def touch(session: Session, name: str, *, now: datetime) -> None:
    """The worker was seen (a keep-alive). A worker without a row has never pulled
    through this database: it gets one at its next pull."""
    session.execute(
        update(ConnectedWorker).where(ConnectedWorker.name == name).values(last_seen_at=now)
    )


def connected(session: Session, *, since: datetime) -> Sequence[ConnectedWorker]:
    """The workers seen since ``since``, by name."""
    return session.scalars(
        select(ConnectedWorker)
        .where(ConnectedWorker.last_seen_at >= since)
        .order_by(ConnectedWorker.name)
    ).all()
