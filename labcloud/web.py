"""Small HTTP glue shared by both APIs: error mapping, credentials extraction,
internal-key checks, the server's logging. No routes live here."""

from __future__ import annotations

import hmac
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from labcloud.contract import INTERNAL_API_KEY_HEADER
from labcloud.errors import LabCloudError, Unauthorized

TOKEN_COOKIE = "id_token"  # noqa: S105 - the cookie name
logger = logging.getLogger(__name__)


def install_error_handlers(app: FastAPI) -> None:
    """Map every domain error to its status code and message, in one place."""

    async def handle(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, LabCloudError)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return JSONResponse({"detail": exc.message}, status_code=exc.status_code, headers=headers)

    app.add_exception_handler(LabCloudError, handle)


def bearer_token(request: Request) -> str:
    """The caller's token, from ``Authorization: Bearer`` or the login cookie."""
    header = request.headers.get("authorization")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        return token.strip()
    cookie = request.cookies.get(TOKEN_COOKIE)
    if cookie:
        return cookie
    raise Unauthorized("not authenticated: send 'Authorization: Bearer <token>'")


def check_internal_key(request: Request, expected: str) -> None:
    """Constant-time comparison of the ``x-api-key`` header with the internal key."""
    provided = request.headers.get(INTERNAL_API_KEY_HEADER, "")
    if not hmac.compare_digest(provided.encode(), expected.encode()):
        raise Unauthorized("invalid or missing internal API key")


def uvicorn_log_config(level: str) -> dict[str, Any]:
    """The service's logs and uvicorn's (access log included) on stderr, one format."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {
            "uvicorn": {"level": "INFO"},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"level": "INFO"},
        },
    }
