"""Fair use: per-user limits on active jobs and on bytes stored.

An account's own value (``User.max_active_jobs``, ``User.max_storage_bytes``) wins;
``None`` there means "the default from the settings", and a default of ``None``
means unlimited. Zero is a real limit: nothing may be added. Requests over a limit
are refused before anything is written, naming the limit and the current use.

Bytes stored are counted in this database (``user_api.files.usage``): what the
user API writes moves the count at once, and what lands without it (presigned
uploads, jobs' results written by the worker API or straight to S3) marks the
count for a recount of that user's folder alone, never of the whole storage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from labcloud.errors import TooManyRequests
from labcloud.storage.base import Entry, Storage
from labcloud.storage.quota import StorageLimitReached, bytes_stored, write_files_within_limit
from user_api.models import USERS, User
from user_api.settings import UserApiSettings

logger = logging.getLogger(__name__)

__all__ = [
    "ActiveJobLimitReached",
    "JobOwner",
    "OwnerState",
    "StorageLimitReached",
    "UsageLimits",
    "bytes_stored",
    "default_limits",
    "limits_of",
    "owner_state",
    "release_active_job",
    "reserve_active_job",
    "storage_limit_lookup",
    "write_within_storage_limit",
]


class ActiveJobLimitReached(TooManyRequests):
    """Your limit of active jobs is reached: wait for a job to end, or cancel one."""


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


@dataclass(frozen=True, slots=True)
class OwnerState:
    """What the services that hold an account's files need to know of it: may its
    files still be reached through signed URLs, and how many bytes may it store
    (None: no limit)."""

    active: bool
    max_storage_bytes: int | None


def owner_state(
    session: Session, subject: str, defaults: UsageLimits, *, local_auth: bool
) -> OwnerState:
    """The state of the account whose files live under ``subject``. An unknown
    account is inactive with local auth (it was deleted); with Cognito it is one
    this API has not seen yet, and Cognito itself vouches for it."""
    user = session.scalars(select(User).where(User.subject == subject)).first()
    if user is None:
        return OwnerState(active=not local_auth, max_storage_bytes=defaults.max_storage_bytes)
    return OwnerState(
        active=user.is_active, max_storage_bytes=limits_of(user, defaults).max_storage_bytes
    )


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
    transition that ends a job gives the slot back (``release_active_job``)."""
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


_FREE_SLOT = (
    update(USERS)
    .where(USERS.c.id == bindparam("user_id"))
    .values(active_jobs=USERS.c.active_jobs - 1)
    .returning(USERS.c.email, USERS.c.email_notifications)
)


@dataclass(frozen=True, slots=True)
class JobOwner:
    """Who is told that a job ended: read by the statement that freed its slot."""

    email: str
    email_notifications: bool


def release_active_job(session: Session, user_id: int) -> JobOwner:
    """Count one active job less for the user (a job of theirs has just ended).

    The same statement returns the owner's address and email preference, so ending
    a job and announcing it need no separate read of the account."""
    email, notifications = session.execute(_FREE_SLOT, {"user_id": user_id}).one()
    return JobOwner(email=email, email_notifications=bool(notifications))


# -- bytes stored ---------------------------------------------------------------------


def write_within_storage_limit(
    storage: Storage, subject: str, key: str, stream: BinaryIO, limit: int | None
) -> Entry:
    """Write ``stream`` to ``key`` unless the user's files would then exceed
    ``limit`` bytes (see ``labcloud.storage.quota``, which the worker API uses for
    jobs' results too)."""
    return write_files_within_limit(storage, subject, [(key, stream)], limit)[0]
