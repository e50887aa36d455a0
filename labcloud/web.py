"""Small HTTP glue shared by both APIs: error mapping, credentials extraction,
internal-key checks, request guards (bounded integers, undecodable paths, body
size), the security schemes declared in OpenAPI, the server's logging. No routes live here."""

from __future__ import annotations

import hmac
import json
import logging
from typing import Annotated, Any
from urllib.parse import unquote_to_bytes

from fastapi import Depends, FastAPI, Path, Request
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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


# -- bounded integers -------------------------------------------------------------------

INT64_MAX = 2**63 - 1
"""The largest integer a database column holds. Path and query integers are bounded
by it (or less): a larger value used to reach SQL and fail there with OverflowError
(a 500); it is now refused with 422 before anything runs."""

MAX_OFFSET = 1_000_000_000
"""The largest ``offset`` of a listing: past any real number of rows."""

IdPath = Annotated[int, Path(ge=1, le=INT64_MAX, description="A job's numeric id.")]
"""A numeric id in a path (``/jobs/{job_id}``): 1 to 2**63-1."""


# -- request guards -----------------------------------------------------------------------


def _json_error(status: int, message: str) -> tuple[Message, Message]:
    body = json.dumps({"detail": message}).encode()
    start: Message = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    return start, {"type": "http.response.body", "body": body}


async def _refuse(send: Send, status: int, message: str) -> None:
    start, body = _json_error(status, message)
    await send(start)
    await send(body)


def _undecodable(raw: bytes) -> bool:
    try:
        unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


class RejectUndecodableUrls:
    """ASGI middleware: 400 for a URL whose path or query string is not UTF-8 once
    percent-decoded (``%FF``, the overlong ``%C0%AE``).

    The server decodes such bytes to U+FFFD, so two different names would reach the
    application as one (and a file stored under one could be read, overwritten or
    deleted through the other)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
            query: bytes = scope.get("query_string", b"")
            if _undecodable(raw_path.split(b"?", 1)[0]) or _undecodable(query):
                await _refuse(
                    send, 400, "the URL is not valid UTF-8 once percent-decoded (%XX escapes)"
                )
                return
        await self.app(scope, receive, send)


# Bodies that are files (uploads) are streamed to storage and limited by the storage
# quota, not by this guard.
_STREAMED_BODIES = (b"multipart/form-data", b"application/octet-stream")


class _BodyTooLarge(Exception):
    pass


class LimitRequestBody:
    """ASGI middleware: 413 for a request body over ``max_bytes`` (uploads excepted).

    A JSON body is parsed whole, on the event loop, before any validation can look
    at it: without a bound, one request of a few hundred megabytes stalls every
    other request of the process. A declared ``Content-Length`` is refused before
    anything is read; a chunked body is counted while it is read."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        content_type = headers.get(b"content-type", b"").lower()
        if content_type.startswith(_STREAMED_BODIES):
            await self.app(scope, receive, send)
            return
        message = (
            f"the request body is over the limit of {self.max_bytes:,} bytes "
            "(see 'Request limits' in the README)"
        )
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _refuse(send, 413, message)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return event

        async def tracking_send(event: Message) -> None:
            nonlocal started
            started = started or event["type"] == "http.response.start"
            await send(event)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if started:
                raise
            await _refuse(send, 413, message)


# -- OpenAPI ------------------------------------------------------------------------

# Credentials are read by ``bearer_token`` (which also takes the login cookie) and
# ``check_internal_key``; these two schemes only declare them in the OpenAPI
# document, so that /docs offers "Authorize" and sends the token. A dependency that
# reads credentials also depends on one of them (``auto_error=False``: they never
# refuse a request themselves).
bearer_scheme = HTTPBearer(
    scheme_name="bearerAuth",
    bearerFormat="JWT",
    description="An ID token: POST /token (local accounts) or Cognito.",
    auto_error=False,
)
internal_key_scheme = APIKeyHeader(
    name=INTERNAL_API_KEY_HEADER,
    scheme_name="internalApiKey",
    description="The key the two APIs share (INTERNAL_API_KEY_SECRET).",
    auto_error=False,
)
BearerScheme = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]
InternalKeyScheme = Annotated[str | None, Depends(internal_key_scheme)]


def install_request_guards(app: FastAPI, *, max_body_bytes: int | None = None) -> None:
    """The guards every request passes before routing: undecodable URLs refused with
    400 and, when ``max_body_bytes`` is given, bodies over it with 413."""
    if max_body_bytes is not None:
        app.add_middleware(LimitRequestBody, max_bytes=max_body_bytes)
    app.add_middleware(RejectUndecodableUrls)
