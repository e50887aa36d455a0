from __future__ import annotations

from typing import cast

from sqlalchemy import Row, Table, bindparam, func, select, update
from sqlalchemy.orm import Session

from user_api.models import User


def get_by_email(session: Session, email: str) -> User | None:
    return session.scalars(select(User).where(func.lower(User.email) == email.lower())).first()


def get_by_subject(session: Session, subject: str) -> User | None:
    return session.scalars(select(User).where(User.subject == subject)).first()


# Every request resolves its caller: a Core statement on the table's columns,
# compiled once, skips the ORM's loading and tracking (a tenth of a short
# request's CPU time).
_USERS = cast(Table, User.__table__)
_CALLER = select(
    _USERS.c.id,
    _USERS.c.subject,
    _USERS.c.email,
    _USERS.c.groups,
    _USERS.c.is_active,
    _USERS.c.is_approved,
    _USERS.c.max_active_jobs,
    _USERS.c.max_storage_bytes,
).where(_USERS.c.subject == bindparam("subject"))


CallerRow = Row[int, str, str, list[str], bool, bool, int | None, int | None]


def caller_by_subject(session: Session, subject: str) -> CallerRow | None:
    """The columns of an account that a request's caller needs, or None."""
    return session.execute(_CALLER, {"subject": subject}).first()


def set_groups(session: Session, user_id: int, groups: list[str]) -> None:
    session.execute(update(User).where(User.id == user_id).values(groups=groups))


def add(session: Session, user: User) -> User:
    session.add(user)
    session.flush()
    return user
