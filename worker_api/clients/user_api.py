"""An HTTP client of the user API's internal route ``PUT /_job_status``, which
takes the status changes of jobs. It says what the user API answered and nothing
more; what an answer means for the status outbox is the relay's business
(``worker_api.queue.status_relay``).

Exceptions::

    UserApiError
    ├── UserApiUnavailable   no answer, 5xx, 401/403/408/429: may succeed later
    └── UserApiRefused       another 4xx (404: the job was deleted there)
"""

from __future__ import annotations

import httpx

from labcloud.contract import INTERNAL_API_KEY_HEADER, StatusUpdate

# Answers after which the same request may succeed: the user API restarting or
# overloaded, or the internal key being rotated on both sides.
_TRANSIENT_CODES = frozenset({401, 403, 408, 429})


class UserApiError(Exception):
    """The user API did not take the status update."""


class UserApiUnavailable(UserApiError):
    """The user API could not take the update now; the same request may succeed later."""


class UserApiRefused(UserApiError):
    """The user API refused the update (a 4xx); sent again, it is refused again."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


class UserApiClient:
    """``PUT /_job_status`` of the user API at ``user_api_url``, authenticated with
    the internal key."""

    def __init__(self, client: httpx.AsyncClient, *, user_api_url: str, api_key: str) -> None:
        self._client = client
        self._url = f"{user_api_url.rstrip('/')}/_job_status"
        self._headers = {INTERNAL_API_KEY_HEADER: api_key}

    async def put_status(self, update: StatusUpdate) -> None:
        """Tell the user API about one status change of a job."""
        try:
            response = await self._client.put(
                self._url, json=update.model_dump(mode="json"), headers=self._headers
            )
        except httpx.HTTPError as exc:
            raise UserApiUnavailable(f"cannot reach the user API: {exc!r}") from exc
        if response.is_success:
            return
        code = response.status_code
        message = f"the user API answered {code} to the status of job {update.job_id}"
        if code >= 500 or code in _TRANSIENT_CODES:
            raise UserApiUnavailable(message)
        raise UserApiRefused(code, f"{message}: {response.text[:300]}")
