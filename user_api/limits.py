"""Fair use: per-user limits on active jobs and on bytes stored.

An account's own value (``User.max_active_jobs``, ``User.max_storage_bytes``) wins;
``None`` there means "the default from the settings", and a default of ``None``
means unlimited. Zero is a real limit: nothing may be added. Requests over a limit
are refused before anything is written, naming the limit and the current use.

Bytes stored are summed from storage on every check rather than kept in a counter:
jobs' outputs are written by workers straight to storage, so a counter in the
database could not be kept correct.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from labcloud.errors import PayloadTooLarge, TooManyRequests
from labcloud.storage.base import Entry, EntryType, Storage
from labcloud.storage.paths import user_root_key
from user_api.models import USERS, User
from user_api.settings import UserApiSettings

logger = logging.getLogger(__name__)


class ActiveJobLimitReached(TooManyRequests):
    """Your limit of active jobs is reached: wait for a job to end, or cancel one."""


class StorageLimitReached(PayloadTooLarge):
    """Your storage limit is reached: delete files you no longer need."""


@dataclass(frozen=True, slots=True)
class UsageLimits:
    """The limits in force for one account; ``None`` means unlimited."""

    max_active_jobs: int | None = None
    max_storage_bytes: int | None = None


NO_LIMITS = UsageLimits()


def default_limits(settings: UserApiSettings) -> UsageLimits:
    """The limits of accounts that have none of their own."""
    return UsageLimits(
        max_active_jobs=settings.default_max_active_jobs,
        max_storage_bytes=settings.default_max_storage_bytes,
    )


class HasLimits(Protocol):
    """An account's own limits: a ``User``, or a row of its columns."""

    @property
    def max_active_jobs(self) -> int | None: ...
    @property
    def max_storage_bytes(self) -> int | None: ...


def limits_of(user: HasLimits, defaults: UsageLimits) -> UsageLimits:
    """The limits in force for ``user``: its own values, else the defaults."""
    return UsageLimits(
        max_active_jobs=(
            user.max_active_jobs if user.max_active_jobs is not None else defaults.max_active_jobs
        ),
        max_storage_bytes=(
            user.max_storage_bytes
            if user.max_storage_bytes is not None
            else defaults.max_storage_bytes
        ),
    )


def storage_limit_of_subject(session: Session, subject: str, defaults: UsageLimits) -> int | None:
    """The storage limit of the account whose files live under ``subject``."""
    user = session.scalars(select(User).where(User.subject == subject)).first()
    if user is None:  # files of an account that no longer exists: nothing to hold them to
        return defaults.max_storage_bytes
    return limits_of(user, defaults).max_storage_bytes


def storage_limit_lookup(session: Session, defaults: UsageLimits) -> Callable[[str], int | None]:
    """``storage_limit_of_subject`` bound to a session: for uploads that name their
    owner only by the storage key (signed URLs)."""
    return lambda subject: storage_limit_of_subject(session, subject, defaults)


# -- active jobs ----------------------------------------------------------------------


# Core statements on the table, compiled once: this runs on every submission.
_TAKE_SLOT = (
    update(USERS)
    .where(USERS.c.id == bindparam("user_id"))
    .values(active_jobs=USERS.c.active_jobs + 1)
)
_TAKE_SLOT_WITHIN_LIMIT = _TAKE_SLOT.where(USERS.c.active_jobs < bindparam("limit"))


def reserve_active_job(session: Session, user_id: int, limit: int | None) -> None:
    """Count one more active job for the user, refused when ``limit`` are active.

    One guarded ``UPDATE`` of the account's counter: the row lock it takes until
    commit serialises two submissions of the same user, so both cannot see "one
    slot left", and its cost does not grow with the number of jobs queued. The
    transition that ends a job gives the slot back (``jobs.repository``)."""
    if limit is None:
        result = session.execute(_TAKE_SLOT, {"user_id": user_id})
    else:
        result = session.execute(_TAKE_SLOT_WITHIN_LIMIT, {"user_id": user_id, "limit": limit})
    if not result.rowcount:  # type: ignore[attr-defined]
        active = session.scalar(select(User.active_jobs).where(User.id == user_id))
        raise ActiveJobLimitReached(
            f"active job limit reached: {active} of {limit} active jobs (queued or running); "
            "wait for one to end or cancel one"
        )


# -- bytes stored ---------------------------------------------------------------------


def bytes_stored(storage: Storage, subject: str) -> int:
    """The total size of the user's files, jobs' results included."""
    return sum(entry.size for entry in storage.iter_files(user_root_key(subject)))


def _size(count: int) -> str:
    return f"{count:,} bytes"


def _stream_size(stream: BinaryIO) -> int | None:
    """The bytes left in ``stream``, when it can tell without being read (an upload
    spooled by the form parser can); None otherwise."""
    try:
        if not stream.seekable():
            return None
        start = stream.tell()
        end = stream.seek(0, 2)
        stream.seek(start)
    except OSError:
        return None
    return end - start


def write_within_storage_limit(
    storage: Storage, subject: str, key: str, stream: BinaryIO, limit: int | None
) -> Entry:
    """Write ``stream`` to ``key`` unless the user's files would then exceed
    ``limit`` bytes (a file replaced at ``key`` no longer counts).

    The size is checked before writing, and the total again after: two uploads
    racing each other may both pass the first check, and the one that finds the
    total over the limit afterwards removes its file, so nothing stays over it."""
    if limit is None:
        return storage.write(key, stream)
    size = _stream_size(stream)
    existing = storage.stat(key)
    replaced = existing.size if existing is not None and existing.type is EntryType.FILE else 0
    used = bytes_stored(storage, subject)
    after = used - replaced + (size or 0)
    if after > limit or (size is None and used >= limit):
        raise StorageLimitReached(
            f"storage limit reached: you store {_size(used)} of your limit of {_size(limit)}; "
            + (f"this upload of {_size(size)} " if size is not None else "this upload ")
            + "would exceed it. Delete files you no longer need."
        )
    entry = storage.write(key, stream)
    total = bytes_stored(storage, subject)
    if total > limit:
        # Only in a race with another upload, or a stream of unknown size: the
        # replaced file (if any) is gone either way, and the limit must hold.
        storage.delete(key)
        logger.info("upload to %s removed: %s over the limit of %s", key, total, limit)
        raise StorageLimitReached(
            f"storage limit reached: with this upload of {_size(entry.size)} your files "
            f"would take {_size(total)}, over your limit of {_size(limit)}; "
            "the upload was not kept"
        )
    return entry
