"""Start-up failures an operator can fix, reported in one line instead of a traceback.

A service that cannot read its catalog, reach its bucket or its database at start
stops, which is right; but Starlette hands uvicorn the whole traceback as the
failure message, and the one line that says what to fix (a bucket name, a
password) drowns in forty lines of framework frames. ``StartupError`` marks the
failures whose message is the whole story; ``one_line_startup_errors`` wraps an
ASGI application so that uvicorn logs only that message for them (and still stops
with its start-up failure status). Anything else keeps its traceback: that is a bug
to report, not a setting to change.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.exc import OperationalError
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class StartupError(Exception):
    """The service cannot start for a reason its message states in full (a setting
    to change, a resource to create or make reachable)."""


def describe_startup_error(exc: BaseException) -> str | None:
    """The one-line reason for a start-up failure an operator can fix, or None
    when ``exc`` is a bug whose traceback matters."""
    if isinstance(exc, StartupError):
        return str(exc)
    if isinstance(exc, OperationalError):
        # The driver's own message ("connection refused", "password authentication
        # failed"); the SQL and the documentation link SQLAlchemy adds say nothing.
        reason = str(exc.orig).strip() if exc.orig is not None else str(exc).splitlines()[0]
        return f"cannot reach the database: {reason}"
    return None


def one_line_startup_errors(app: ASGIApp) -> ASGIApp:
    """``app``, with start-up failures that ``describe_startup_error`` knows reported
    as one line (see the module's docstring)."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return
        held: list[Message] = []

        async def holding_send(message: Message) -> None:
            # The failure message is sent before the exception reaches us: keep it
            # until the exception says which of the two messages uvicorn gets.
            if message["type"] == "lifespan.startup.failed":
                held.append(message)
                return
            await send(message)

        try:
            await app(scope, receive, holding_send)
        except BaseException as exc:
            reason = describe_startup_error(exc) if held else None
            if reason is None:
                for message in held:
                    await send(message)
                raise
            await send({"type": "lifespan.startup.failed", "message": f"cannot start: {reason}"})
            return
        for message in held:
            await send(message)

    return wrapped


def wrap_factory(factory: Any) -> Any:
    """An application factory returning ``one_line_startup_errors(factory())``."""

    def make() -> ASGIApp:
        return one_line_startup_errors(factory())

    return make
