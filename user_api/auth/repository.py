from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from user_api.models import User


def get_by_email(session: Session, email: str) -> User | None:
    return session.scalars(select(User).where(func.lower(User.email) == email.lower())).first()


def get_by_subject(session: Session, subject: str) -> User | None:
    return session.scalars(select(User).where(User.subject == subject)).first()


def add(session: Session, user: User) -> User:
    session.add(user)
    session.flush()
    return user
