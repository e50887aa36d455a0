"""``GET /health``: whether this process serves and reaches its database, for load
balancers, container health checks and service managers. No authentication, and
one ``SELECT 1``, so that probing it often costs nothing."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from labcloud.errors import Unavailable
from user_api.dependencies import SessionDep

router = APIRouter(tags=["health"])


class DatabaseUnavailable(Unavailable):
    """The user API's database does not answer; try again later."""


@router.get("/health")
def get_health(session: SessionDep) -> dict[str, str]:
    """``{"status": "ok"}`` while this process serves and reaches its database
    (503 otherwise)."""
    try:
        session.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        raise DatabaseUnavailable(
            f"the user API's database does not answer: {type(exc).__name__}"
        ) from exc
    return {"status": "ok"}
