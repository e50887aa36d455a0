"""An HTTP client of the worker API's internal routes (``/_jobs``): enqueue one job
or a batch, cancel a job. It says what the worker API answered and nothing more;
what a refusal means for a job is the worker outbox's business
(``user_api.jobs.outbox``).

Exceptions::

    WorkerApiError
    ├── WorkerApiUnavailable   no answer, 5xx, 401/403/408/429: may succeed later
    └── WorkerApiRefused       another 4xx: the same request will be refused again
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from labcloud.contract import (
    INTERNAL_API_KEY_HEADER,
    LOG_COMPLETE_HEADER,
    LOG_NEXT_OFFSET_HEADER,
)

# Answers after which the same request may succeed: the worker API restarting or
# overloaded, or the internal key being rotated on both sides.
_TRANSIENT_CODES = frozenset({401, 403, 408, 429})


class WorkerApiError(Exception):
    """The worker API did not do what was asked."""


class WorkerApiUnavailable(WorkerApiError):
    """The worker API could not take the request now; the same request may succeed later."""


class WorkerApiRefused(WorkerApiError):
    """The worker API refused the request (a 4xx); sent again, it is refused again."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(f"worker API refused the job ({status_code}): {detail}")
        self.status_code = status_code


@dataclass(frozen=True, slots=True)
class LiveLogPiece:
    """Bytes of a job's live log from an offset, the offset that follows them, and
    whether the log is complete (the job ended, everything shipped is in)."""

    data: bytes
    next_offset: int
    complete: bool


@dataclass(frozen=True, slots=True)
class ProgressReport:
    """A job's latest progress as the worker API knows it."""

    fraction: float | None
    message: str | None
    updated_at: datetime


class WorkerApiClient:
    """The worker API's internal routes, over ``client`` (its base URL set to the
    worker API), authenticated with the internal key."""

    def __init__(self, client: httpx.AsyncClient, internal_key: str) -> None:
        self._client = client
        self._headers = {INTERNAL_API_KEY_HEADER: internal_key}

    async def enqueue(self, job: dict[str, Any]) -> None:
        """``POST /_jobs``: queue one job (a ``QueueJob`` as JSON); idempotent."""
        await self._call("POST", "/_jobs", json=job)

    async def enqueue_batch(self, jobs: Sequence[dict[str, Any]]) -> None:
        """``POST /_jobs/batch``: queue several jobs at once, all or none (an invalid
        one refuses the batch with 422; a worker API without the route, 404/405)."""
        await self._call("POST", "/_jobs/batch", json=list(jobs))

    async def cancel(self, job_id: int, *, discard_outputs: bool) -> None:
        """``DELETE /_jobs/{job_id}``: cancel the job if it is active (idempotent)."""
        await self._call(
            "DELETE",
            f"/_jobs/{job_id}",
            params={"discard_outputs": str(discard_outputs).lower()},
        )

    async def live_log(self, job_id: int, offset: int, *, wait: float) -> LiveLogPiece | None:
        """``GET /_jobs/{job_id}/log``: the live log from ``offset``, waiting up to
        ``wait`` seconds for new bytes; ``None`` when the queue does not know the
        job (not delivered yet, or gone)."""
        response = await self._request(
            "GET",
            f"/_jobs/{job_id}/log",
            params={"offset": offset, "wait": wait},
            timeout=httpx.Timeout(10, read=wait + 10),
        )
        if response.status_code == 404:
            return None
        self._check(response)
        try:
            next_offset = int(response.headers[LOG_NEXT_OFFSET_HEADER])
        except (KeyError, ValueError) as exc:
            raise WorkerApiUnavailable(f"malformed live log answer: {exc!r}") from exc
        complete = response.headers.get(LOG_COMPLETE_HEADER) == "true"
        return LiveLogPiece(response.content, next_offset, complete)

    async def progress(self, job_id: int, *, answer_within: float) -> ProgressReport | None:
        """``GET /_jobs/{job_id}/progress``: the tool's latest progress, ``None``
        when it reported none."""
        response = await self._request("GET", f"/_jobs/{job_id}/progress", timeout=answer_within)
        if response.status_code == 404:
            return None
        self._check(response)
        body = response.json()
        if body is None:
            return None
        try:
            return ProgressReport(
                fraction=None if body["fraction"] is None else float(body["fraction"]),
                message=body["message"],
                updated_at=datetime.fromisoformat(body["updated_at"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WorkerApiUnavailable(f"malformed progress answer: {exc!r}") from exc

    async def waiting(self, job_id: int, *, answer_within: float) -> dict[str, Any] | None:
        """``GET /_jobs/{job_id}/waiting``: why the queued job waits (the worker
        API's ``JobWaiting`` as JSON), ``None`` when it is not queued there."""
        response = await self._request("GET", f"/_jobs/{job_id}/waiting", timeout=answer_within)
        self._check(response)
        body: dict[str, Any] | None = response.json()
        return body

    async def workers(self, *, answer_within: float) -> list[dict[str, Any]]:
        """``GET /_workers``: the connected workers, their offers and held jobs."""
        response = await self._request("GET", "/_workers", timeout=answer_within)
        self._check(response)
        body: list[dict[str, Any]] = response.json()
        return body

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._client.request(method, path, headers=self._headers, **kwargs)
        except httpx.HTTPError as exc:
            raise WorkerApiUnavailable(f"worker API unreachable: {exc!r}") from exc

    @staticmethod
    def _check(response: httpx.Response) -> None:
        if response.is_success:
            return
        code = response.status_code
        if code >= 500 or code in _TRANSIENT_CODES:
            raise WorkerApiUnavailable(f"worker API answered {code}: {response.text[:300]}")
        raise WorkerApiRefused(code, response.text[:2000])

    async def _call(self, method: str, path: str, **kwargs: Any) -> None:
        try:
            response = await self._client.request(method, path, headers=self._headers, **kwargs)
        except httpx.HTTPError as exc:
            raise WorkerApiUnavailable(f"worker API unreachable: {exc!r}") from exc
        if response.is_success:
            return
        code = response.status_code
        if code >= 500 or code in _TRANSIENT_CODES:
            raise WorkerApiUnavailable(f"worker API answered {code}: {response.text[:300]}")
        raise WorkerApiRefused(code, response.text[:2000])
