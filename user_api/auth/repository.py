from __future__ import annotations

from sqlalchemy import Row, bindparam, func, select, update
from sqlalchemy.orm import Session

from user_api.models import USERS, User


def get_by_email(session: Session, email: str) -> User | None:
    return session.scalars(select(User).where(func.lower(User.email) == email.lower())).first()


def get_by_subject(session: Session, subject: str) -> User | None:
    return session.scalars(select(User).where(User.subject == subject)).first()


# Every request resolves its caller: a Core statement on the table's columns,
# compiled once, skips the ORM's loading and tracking (a tenth of a short
# request's CPU time).
_CALLER = select(
    USERS.c.id,
    USERS.c.subject,
    USERS.c.email,
    USERS.c.groups,
    USERS.c.is_active,
    USERS.c.is_approved,
    USERS.c.max_active_jobs,
    USERS.c.max_storage_bytes,
).where(USERS.c.subject == bindparam("subject"))


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
