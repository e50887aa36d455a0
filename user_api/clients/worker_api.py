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
from typing import Any

import httpx

from labcloud.contract import INTERNAL_API_KEY_HEADER

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
