"""The bytes each account's files take, counted in the user API's database.

``StorageUsageLedger`` is the ``labcloud.storage.quota.UsageLedger`` of the user
API: one ``storage_usage`` row per account, so that a storage limit is checked
without listing storage (on S3 a listing of the account's whole prefix per upload).
It stays correct with two services and several processes of each writing:

- every write through the user API *reserves* its bytes with one guarded ``UPDATE
  ... SET used_bytes = used_bytes + :n WHERE used_bytes + :n <= :limit`` in a short
  transaction of its own, writes with no transaction open, then *settles* what it
  wrote; a deletion subtracts what it removed. The row lock the ``UPDATE`` takes
  (SQLite: the write lock) serialises two writers of one account, so two uploads
  cannot both take the last bytes, and no lock is held while a file moves;
- bytes that land outside the API are not counted as they land: the count is
  marked *unsettled* until they may have landed (a presigned upload URL handed
  out: until it expires; a job that ended: for its last log uploads,
  ``note_job_ended``), and a check while it is unsettled recounts from storage;
  the worker API reports what its own routes write (``adjust``);
- a recount walks only the account's folder, with no transaction open, and is
  stored only if nothing changed the row while it walked (``version``) and no write
  is in flight; otherwise the count the changes kept stands, and is recounted at a
  later check. A count older than ``STORAGE_USAGE_MAX_AGE_SECONDS`` is recounted
  too, so drift (a process that died between reserve and settle, two replacements
  of one file at once) does not last.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Update, case, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from labcloud.db import unit_of_work, utcnow
from labcloud.storage.base import Storage
from labcloud.storage.quota import bytes_stored
from user_api.models import JOBS, STORAGE_USAGE, USERS
from user_api.settings import UserApiSettings

logger = logging.getLogger(__name__)

_T = STORAGE_USAGE

# How long after a job ends its results may still land: the worker API lets the
# last worker of a canceled job upload its log for a grace (CANCEL_LOG_GRACE_SECONDS,
# 120 s by default); results of a job that ended normally are in before its status.
JOB_RESULTS_SETTLE = timedelta(seconds=180)


@dataclass(frozen=True, slots=True)
class _Row:
    used_bytes: int
    in_flight: int
    version: int
    counted_at: datetime
    changed_at: datetime
    unsettled_until: datetime | None


def _unsettle(until: datetime) -> dict[str, object]:
    """The values that keep a count unsettled until ``until`` at least."""
    return {
        "unsettled_until": case(
            (_T.c.unsettled_until.is_(None), until),
            (_T.c.unsettled_until < until, until),
            else_=_T.c.unsettled_until,
        )
    }


def note_job_ended(session: Session, user_id: int, now: datetime) -> None:
    """In the transaction that ends a job: its results (written by workers, outside
    the user API) are in storage or about to be, so the owner's count is recounted
    at its next check (not here: a status update must not wait for a listing)."""
    owner = select(USERS.c.subject).where(USERS.c.id == user_id).scalar_subquery()
    session.execute(
        update(_T)
        .where(_T.c.subject == owner)
        .values(version=_T.c.version + 1, **_unsettle(now + JOB_RESULTS_SETTLE))
    )


def note_job_deleted(session: Session, job_id: int, now: datetime) -> None:
    """In the transaction that deletes job ``job_id`` after it had ended (its end
    marked the count already, long ago perhaps): its result folders are removed
    with it, so the owner's count is recounted at its next check."""
    owner = (
        select(USERS.c.subject)
        .join(JOBS, JOBS.c.user_id == USERS.c.id)
        .where(JOBS.c.id == job_id)
        .scalar_subquery()
    )
    session.execute(
        update(_T)
        .where(_T.c.subject == owner)
        .values(version=_T.c.version + 1, **_unsettle(now + JOB_RESULTS_SETTLE))
    )


class StorageUsageLedger:
    """The ``storage_usage`` table as a ``UsageLedger``. Each method runs its own
    short transactions (callers hold none while files move); blocking."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        storage: Storage,
        *,
        max_age_seconds: float,
        settle_seconds: float,
        stuck_seconds: float,
    ) -> None:
        self._sessions = session_factory
        self._storage = storage
        self._max_age = timedelta(seconds=max_age_seconds)
        self._settle = timedelta(seconds=settle_seconds)
        self._stuck = timedelta(seconds=stuck_seconds)

    @classmethod
    def from_settings(
        cls, session_factory: sessionmaker[Session], storage: Storage, settings: UserApiSettings
    ) -> StorageUsageLedger:
        return cls(
            session_factory,
            storage,
            max_age_seconds=settings.storage_usage_max_age_seconds,
            settle_seconds=settings.storage_usage_settle_seconds,
            stuck_seconds=settings.storage_usage_stuck_seconds,
        )

    @classmethod
    def of_app(cls, state: Any) -> StorageUsageLedger:
        """The ledger of a running user API: its database, storage and settings
        (``app.state``, set up by ``user_api.app``)."""
        return cls.from_settings(state.session_factory, state.storage, state.settings)

    # -- reading --------------------------------------------------------------------

    def _row(self, session: Session, subject: str) -> _Row | None:
        found = session.execute(
            select(
                _T.c.used_bytes,
                _T.c.in_flight,
                _T.c.version,
                _T.c.counted_at,
                _T.c.changed_at,
                _T.c.unsettled_until,
            ).where(_T.c.subject == subject)
        ).first()
        return None if found is None else _Row(*found)

    def _needs_recount(self, row: _Row, now: datetime) -> bool:
        return row.unsettled_until is not None or now - row.counted_at >= self._max_age

    def used(self, subject: str) -> int:
        with unit_of_work(self._sessions) as session:
            row = self._row(session, subject)
        if row is None or self._needs_recount(row, utcnow()):
            return self.recount(subject)
        return row.used_bytes

    def recount(self, subject: str) -> int:
        """Count ``subject``'s bytes from storage (a walk of their folder only) and
        store the count unless the row changed meanwhile; returns the bytes used."""
        started = utcnow()
        row = self._ensure_row(subject, started)
        walked = bytes_stored(self._storage, subject)  # no transaction open
        finished = utcnow()
        unsettled = row.unsettled_until
        if unsettled is not None and unsettled <= started:
            unsettled = None  # everything that could land outside had landed before the walk
        with unit_of_work(self._sessions) as session:
            stored = session.execute(
                update(_T)
                .where(
                    _T.c.subject == subject,
                    _T.c.version == row.version,
                    # A write in flight may or may not be in the walk; one that has
                    # not settled for this long died with its process.
                    (_T.c.in_flight == 0) | (_T.c.changed_at < finished - self._stuck),
                )
                .values(
                    used_bytes=walked,
                    in_flight=0,
                    version=_T.c.version + 1,
                    counted_at=started,
                    changed_at=finished,
                    unsettled_until=unsettled,
                )
            ).rowcount  # type: ignore[attr-defined]
            if stored:
                if walked != row.used_bytes:
                    logger.info(
                        "storage usage of %s recounted: %d bytes (counted %d)",
                        subject,
                        walked,
                        row.used_bytes,
                    )
                return walked
            now_row = self._row(session, subject)
        # Changed while the walk ran: the changes' count stands until a later recount;
        # a check meanwhile takes the larger of the two (what it knows may be stored).
        return max(walked, now_row.used_bytes if now_row is not None else 0)

    def _ensure_row(self, subject: str, now: datetime) -> _Row:
        """The account's row, inserted when missing. A new row is unsettled until
        its first recount is stored, so a recount that loses a race leaves it to be
        counted again rather than trusted at zero."""
        with unit_of_work(self._sessions) as session:
            row = self._row(session, subject)
        if row is not None:
            return row
        try:
            with unit_of_work(self._sessions) as session:
                session.execute(
                    _T.insert().values(
                        subject=subject,
                        used_bytes=0,
                        in_flight=0,
                        version=0,
                        counted_at=now,
                        changed_at=now,
                        unsettled_until=now,
                    )
                )
        except IntegrityError:
            pass  # another process inserted it first
        with unit_of_work(self._sessions) as session:
            inserted = self._row(session, subject)
        assert inserted is not None
        return inserted

    # -- writing --------------------------------------------------------------------

    def _change(self, subject: str, statement: Update) -> int | None:
        """Run a change of ``subject``'s row returning ``used_bytes``; None when no
        row matched (refused by its guard, or no row)."""
        with unit_of_work(self._sessions) as session:
            return session.execute(
                statement.where(_T.c.subject == subject).returning(_T.c.used_bytes)
            ).scalar()

    def _delta(self, delta: int, **values: object) -> Update:
        return update(_T).values(
            used_bytes=_T.c.used_bytes + delta,
            version=_T.c.version + 1,
            changed_at=utcnow(),
            **values,
        )

    def reserve(self, subject: str, nbytes: int, limit: int | None, *, open_ended: bool) -> bool:
        # Brings the count up to date first (recounting when bytes may have landed
        # outside the API), and makes sure the row exists for the guarded update.
        self.used(subject)
        statement = self._delta(nbytes, in_flight=_T.c.in_flight + 1)
        if limit is not None and open_ended:
            statement = statement.where(_T.c.used_bytes + nbytes < limit)
        elif limit is not None and nbytes > 0:
            statement = statement.where(_T.c.used_bytes + nbytes <= limit)
        return self._change(subject, statement) is not None

    def grow(self, subject: str, nbytes: int, limit: int | None) -> bool:
        statement = self._delta(nbytes)
        if limit is not None and nbytes > 0:
            statement = statement.where(_T.c.used_bytes + nbytes <= limit)
        return self._change(subject, statement) is not None

    def settle(self, subject: str, reserved: int, written: int | None) -> int:
        in_flight = case((_T.c.in_flight > 0, _T.c.in_flight - 1), else_=0)
        if written is None:
            # What the failed write left is unknown: count again at the next check.
            statement = self._delta(-reserved, in_flight=in_flight, **_unsettle(utcnow()))
        else:
            statement = self._delta(written - reserved, in_flight=in_flight)
        used = self._change(subject, statement)
        return used if used is not None else self.used(subject)

    def adjust(self, subject: str, delta: int) -> int:
        used = self._change(subject, self._delta(delta))
        # No row yet: the first check counts from storage, this change included.
        return used if used is not None else self.used(subject)

    def expect_outside_writes(self, subject: str, *, expires_in: float) -> None:
        """A presigned upload URL of ``subject``'s was handed out, good for
        ``expires_in`` seconds: until it expires (and uploads begun before then
        have finished, ``STORAGE_USAGE_SETTLE_SECONDS``), checks recount."""
        until = utcnow() + timedelta(seconds=expires_in) + self._settle
        with unit_of_work(self._sessions) as session:
            session.execute(
                update(_T)
                .where(_T.c.subject == subject)
                .values(version=_T.c.version + 1, **_unsettle(until))
            )
