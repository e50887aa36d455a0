"""Client of the worker API (contract section 2).

It fetches and refreshes the bearer token (through Cognito when the API's
``/access_info`` names a user pool, else at the user API's ``POST /token``), leases
jobs (with the long-poll ``wait`` extension), reports statuses (which double as
keep-alives), and moves files through the signed requests the API hands out. Signed
requests are sent without the bearer token, and file bodies are streamed in chunks
in both directions.

The client is safe to share between the runner's threads.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import SecretStr, ValidationError

from labcloud.auth.cognito import CognitoAppClient, CognitoLogin
from labcloud.contract import (
    JobStatus,
    Outcome,
    OutputKind,
    Progress,
    SignedRequest,
    StatusReport,
)
from labcloud.errors import BadRequest, Forbidden, LabCloudError, Unauthorized
from labcloud.storage.paths import PARTIAL_PREFIX
from worker_runner import RunnerError

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024
# Refresh the token this long before it expires, so a request never carries a token
# that expires in flight.
TOKEN_MARGIN_S = 60.0
RETRY_DELAYS_S: tuple[float, ...] = (0.5, 1.0, 2.0)

_T = TypeVar("_T")


class WorkerApiError(RunnerError):
    """The worker API did not accept a request."""

    def __init__(self, message: str | None = None, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class AuthenticationFailed(WorkerApiError):
    """The token endpoint refused the worker's credentials."""


class JobGone(WorkerApiError):
    """The job is no longer leased to this worker (canceled, deleted or re-assigned)."""


@dataclass(frozen=True, slots=True)
class LogShipped:
    """The worker API's answer to a live log chunk: the offset to send next, and
    whether the log reached its bound (later output is dropped there)."""

    next_offset: int
    truncated: bool


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:200]
    return str(body)[:200]


class WorkerApiClient:
    """Talks to the worker API on behalf of one worker account."""

    def __init__(
        self,
        *,
        api_url: str,
        auth_url: str | None,
        username: str,
        password: SecretStr | str,
        cognito_secret: SecretStr | str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        retry_delays: Sequence[float] = RETRY_DELAYS_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api_url = api_url.rstrip("/")
        self._auth_url = auth_url.rstrip("/") if auth_url else None
        self._username = username
        self._password = password if isinstance(password, SecretStr) else SecretStr(password)
        self._cognito_secret = (
            cognito_secret.get_secret_value()
            if isinstance(cognito_secret, SecretStr)
            else cognito_secret
        )
        # When tokens are due for renewal is judged by this clock (seconds).
        self._clock = clock
        # How this worker logs in, found from the API's /access_info on first use.
        self._login: Callable[[], tuple[str, float]] | None = None
        self._timeout = timeout
        self._retry_delays = tuple(retry_delays)
        self._api = httpx.Client(timeout=timeout, transport=transport)
        # Signed requests go to storage (S3 or the API's own signed routes) and must
        # not carry the bearer token, so they use a client that never sets one.
        self._signed = httpx.Client(timeout=timeout, transport=transport, follow_redirects=True)
        self._token_lock = threading.Lock()
        self._token: str | None = None
        self._token_refresh_at = 0.0
        # The Cognito login in use once the API named a pool (it counts the refreshes).
        self.cognito_login: CognitoLogin | None = None

    def close(self) -> None:
        """Close the HTTP connections."""
        self._api.close()
        self._signed.close()

    def __enter__(self) -> WorkerApiClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- token -----------------------------------------------------------------

    def _fetch_token(self) -> None:
        if self._login is None:
            self._login = self._discover_login()
        token, expires_in = self._login()
        self._token = token
        # Short-lived tokens are refreshed at half their life instead of never.
        margin = min(TOKEN_MARGIN_S, expires_in / 2)
        self._token_refresh_at = self._clock() + expires_in - margin

    def _discover_login(self) -> Callable[[], tuple[str, float]]:
        """Log in through Cognito when the API's ``/access_info`` names a pool (as
        DECODE's worker does), else at the user API's ``POST /token``."""
        try:
            response = self._api.get(f"{self._api_url}/access_info")
        except httpx.HTTPError as exc:
            raise WorkerApiError(f"access_info request failed: {exc}") from exc
        if response.status_code == 404:
            # An API without the route (a stand-in): only local auth has no pool to name.
            return self._local_token
        if response.status_code != 200:
            raise WorkerApiError(
                f"access_info answered {response.status_code}: {_detail(response)}",
                status_code=response.status_code,
            )
        try:
            info = response.json()
            cognito = info.get("cognito") or {}
            # Upstream's worker API sends only "cognito"; LabCloud's also "auth".
            uses_cognito = info.get("auth", "cognito") == "cognito" and bool(
                cognito.get("client_id")
            )
        except (ValueError, AttributeError) as exc:
            raise WorkerApiError(f"malformed access_info response: {exc}") from exc
        if uses_cognito:
            logger.info("logging in through Cognito as %s", self._username)
            login = CognitoLogin(
                CognitoAppClient(
                    client_id=str(cognito["client_id"]),
                    region=cognito.get("region") or None,
                    client_secret=self._cognito_secret,
                ),
                self._username,
                self._password.get_secret_value(),
            )
            self.cognito_login = login
            return lambda: self._cognito_token(login)
        if self._auth_url is None:
            raise AuthenticationFailed(
                "the worker API uses local auth: AUTH_URL (the user API) must be set"
            )
        return self._local_token

    def _cognito_token(self, login: CognitoLogin) -> tuple[str, float]:
        try:
            tokens = login.tokens()
        except (Unauthorized, Forbidden, BadRequest) as exc:
            raise AuthenticationFailed(
                f"Cognito refused {self._username}: {exc.message}", status_code=exc.status_code
            ) from exc
        except LabCloudError as exc:
            raise WorkerApiError(f"Cognito login failed: {exc.message}") from exc
        return tokens.id_token, float(tokens.expires_in)

    def _local_token(self) -> tuple[str, float]:
        try:
            response = self._api.post(
                f"{self._auth_url}/token",
                data={
                    "username": self._username,
                    "password": self._password.get_secret_value(),
                },
            )
        except httpx.HTTPError as exc:
            raise WorkerApiError(f"token request failed: {exc}") from exc
        if response.status_code in (400, 401, 403):
            raise AuthenticationFailed(
                f"token refused for {self._username}: {_detail(response)}",
                status_code=response.status_code,
            )
        if response.status_code not in (200, 201):
            raise WorkerApiError(
                f"token request answered {response.status_code}: {_detail(response)}",
                status_code=response.status_code,
            )
        body = response.json()
        try:
            return str(body["id_token"]), float(body["expires_in"])
        except (KeyError, TypeError, ValueError) as exc:
            raise WorkerApiError(f"malformed token response: {exc}") from exc

    def authenticate(self) -> None:
        """Fetch a token now: lets a starting worker find out at once that its
        credentials are wrong (``AuthenticationFailed``)."""
        self._bearer(force_refresh=True)

    def _bearer(self, *, force_refresh: bool = False) -> str:
        with self._token_lock:
            if force_refresh or self._token is None or self._clock() >= self._token_refresh_at:
                self._fetch_token()
            assert self._token is not None
            return self._token

    # -- API calls -------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int | float] | None = None,
        json: dict[str, Any] | None = None,
        content: bytes | None = None,
        timeout: httpx.Timeout | float | None = None,
        retry: bool = True,
    ) -> httpx.Response:
        """One authenticated API call. Refreshes the token once on a 401 and retries
        transport errors and 5xx answers when ``retry`` is set; returns any other
        answer for the caller to judge."""
        delays = self._retry_delays if retry else ()
        refreshed = False
        attempt = 0
        while True:
            token = self._bearer()
            headers = {"Authorization": f"Bearer {token}"}
            if content is not None:
                headers["Content-Type"] = "application/octet-stream"
            try:
                response = self._api.request(
                    method,
                    f"{self._api_url}{path}",
                    params=dict(params) if params is not None else None,
                    json=json,
                    content=content,
                    headers=headers,
                    timeout=timeout if timeout is not None else self._timeout,
                )
            except httpx.HTTPError as exc:
                if attempt < len(delays):
                    time.sleep(delays[attempt])
                    attempt += 1
                    continue
                raise WorkerApiError(f"{method} {path} failed: {exc}") from exc
            if response.status_code == 401 and not refreshed:
                refreshed = True
                self._bearer(force_refresh=True)
                continue
            if response.status_code >= 500 and attempt < len(delays):
                time.sleep(delays[attempt])
                attempt += 1
                continue
            return response

    @staticmethod
    def _fail(response: httpx.Response, what: str) -> WorkerApiError:
        return WorkerApiError(
            f"{what}: {response.status_code} {_detail(response)}",
            status_code=response.status_code,
        )

    def pull_jobs(
        self, resources: Mapping[str, str | int], *, limit: int = 1, wait: float = 0
    ) -> dict[str, dict[str, Any]]:
        """Lease up to ``limit`` jobs that fit ``resources`` (``memory``,
        ``cpu_cores``, ``gpu_mem`` and optionally ``gpu_model``, ``gpu_archi``).

        The server may hold the request up to ``wait`` seconds until a job arrives.
        Returns ``{queue_id: raw JobSpecs}``; the specs stay raw so that a malformed
        one fails only its own job, not the pull."""
        params: dict[str, str | int | float] = {**resources, "limit": limit}
        if wait > 0:
            params["wait"] = int(wait) if float(wait).is_integer() else wait
        # The read timeout must outlast the server's hold.
        timeout = httpx.Timeout(self._timeout, read=wait + self._timeout)
        response = self._call("GET", "/jobs", params=params, timeout=timeout, retry=False)
        if response.status_code != 200:
            raise self._fail(response, "pull")
        body = response.json()
        if not isinstance(body, dict) or not all(isinstance(v, dict) for v in body.values()):
            raise WorkerApiError("pull answered something other than {queue_id: specs}")
        return {str(queue_id): specs for queue_id, specs in body.items()}

    def put_status(
        self,
        queue_id: str,
        status: JobStatus,
        runtime_details: str | None = None,
        *,
        outcome: Outcome | None = None,
        retry: bool = True,
    ) -> None:
        """Report ``status`` for a job (also renews its lease); a terminal status
        carries how the run went (``outcome``) as the JSON body, a
        ``StatusReport``.

        Raises ``JobGone`` on 404: the job is no longer this worker's."""
        params: dict[str, str] = {"status": status.value}
        if runtime_details is not None:
            params["runtime_details"] = runtime_details
        body = None
        if outcome is not None:
            body = StatusReport(outcome=outcome).model_dump(mode="json", exclude_none=True)
        response = self._call(
            "PUT",
            f"/jobs/{quote(queue_id, safe='')}/status",
            params=params,
            json=body,
            retry=retry,
        )
        if response.status_code == 404:
            raise JobGone(f"job {queue_id} is no longer leased to this worker", status_code=404)
        if response.status_code not in (200, 204):
            raise self._fail(response, f"status {status.value} of job {queue_id}")

    def ship_log(
        self,
        queue_id: str,
        run: str,
        offset: int,
        data: bytes,
        progress: Progress | None = None,
    ) -> LogShipped:
        """Append ``data``, the output of the run ``run`` (a token of the run)
        from ``offset``, to the job's live log, with the tool's latest
        ``progress``; not retried here (the shipper sends the same bytes again
        later). Raises ``JobGone`` on 404."""
        params: dict[str, str | int | float] = {"offset": offset, "run": run}
        if progress is not None:
            if progress.fraction is not None:
                params["progress"] = progress.fraction
            if progress.message is not None:
                params["progress_message"] = progress.message
        response = self._call(
            "POST",
            f"/jobs/{quote(queue_id, safe='')}/log",
            params=params,
            content=data,
            retry=False,
        )
        if response.status_code == 404:
            raise JobGone(f"job {queue_id} is no longer leased to this worker", status_code=404)
        if response.status_code != 200:
            raise self._fail(response, f"live log of job {queue_id}")
        try:
            body = response.json()
            return LogShipped(int(body["next_offset"]), bool(body["truncated"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise WorkerApiError(f"malformed live log answer: {exc}") from exc

    def _signed_request(self, response: httpx.Response, what: str) -> SignedRequest:
        try:
            return SignedRequest.model_validate(response.json())
        except (ValueError, ValidationError) as exc:
            raise WorkerApiError(f"{what}: malformed signed request: {exc}") from exc

    def _absolute(self, url: str) -> str:
        # A signed URL of the API's own local storage may come as a path.
        return str(httpx.URL(self._api_url + "/").join(url))

    def _transfer(self, what: str, attempt_once: Callable[[], _T]) -> _T:
        """Run one whole transfer (sign, then move the bytes), again from the start
        after a transport error or a 5xx, since a signed URL may have expired."""
        for delay in (*self._retry_delays, None):
            try:
                return attempt_once()
            except JobGone:
                raise
            except WorkerApiError as exc:
                transient = exc.status_code is None or exc.status_code >= 500
                if delay is None or not transient:
                    raise
                logger.info("%s failed (%s), retrying in %.1f s", what, exc.message, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def download(
        self, uri: str, destination: Path, *, check: Callable[[], None] | None = None
    ) -> int:
        """Download the input ``uri`` to ``destination`` and return its size.

        The body is streamed to a temporary file beside the destination, which is
        renamed on success, so a partial download never looks complete. Its name is
        short and uses the storage's reserved prefix, so it fits beside any name the
        API accepts (up to 255 bytes) and cannot be one of the job's inputs.
        ``check`` is called between chunks and may raise to interrupt the
        transfer."""
        return self._transfer(
            f"download of {uri}", lambda: self._download_once(uri, destination, check)
        )

    def _download_once(self, uri: str, destination: Path, check: Callable[[], None] | None) -> int:
        response = self._call("GET", f"/files/{quote(uri, safe='/')}/url")
        if response.status_code != 200:
            raise self._fail(response, f"download URL of {uri}")
        signed = self._signed_request(response, f"download URL of {uri}")
        descriptor, temporary = tempfile.mkstemp(dir=destination.parent, prefix=PARTIAL_PREFIX)
        partial = Path(temporary)
        size = 0
        try:
            with (
                os.fdopen(descriptor, "wb") as sink,
                self._signed.stream(
                    signed.method,
                    self._absolute(signed.url),
                    headers=signed.headers,
                    data=signed.data or None,
                ) as stream,
            ):
                if stream.status_code >= 400:
                    stream.read()
                    raise self._fail(stream, f"download of {uri}")
                for chunk in stream.iter_bytes(CHUNK_SIZE):
                    if check is not None:
                        check()
                    sink.write(chunk)
                    size += len(chunk)
            partial.replace(destination)
        except httpx.HTTPError as exc:
            raise WorkerApiError(f"download of {uri} failed: {exc}") from exc
        finally:
            partial.unlink(missing_ok=True)
        return size

    def upload(self, queue_id: str, kind: OutputKind, relative: str, source: Path) -> None:
        """Upload one result file of a job, streamed from disk.

        ``relative`` is the file's path relative to its ``files_up`` folder. As
        DECODE's worker does, one upload URL is asked for per file, with
        ``base_path`` = the file's folder, and the multipart part carries the file's
        name. A refusal raises ``WorkerApiError`` with the answer's status (400: the
        name, 413: the owner's storage limit)."""
        self._transfer(
            f"upload of {kind.value}/{relative}",
            lambda: self._upload_once(queue_id, kind, relative, source),
        )

    def _upload_once(self, queue_id: str, kind: OutputKind, relative: str, source: Path) -> None:
        path = PurePosixPath(relative)
        folder = "" if str(path.parent) == "." else str(path.parent)
        response = self._call(
            "POST",
            f"/jobs/{quote(queue_id, safe='')}/files/url",
            params={"type": kind.value, "base_path": folder},
        )
        if response.status_code == 404:
            raise JobGone(f"job {queue_id} is no longer leased to this worker", status_code=404)
        if response.status_code not in (200, 201):
            raise self._fail(response, f"upload URL of {kind.value}/{relative}")
        signed = self._signed_request(response, f"upload URL of {kind.value}/{relative}")
        form = {key: str(value) for key, value in signed.data.items()}
        try:
            with source.open("rb") as body:
                # httpx reads file fields in chunks while sending; the file is never
                # held in memory whole.
                answer = self._signed.request(
                    signed.method,
                    self._absolute(signed.url),
                    headers=signed.headers,
                    data=form,
                    files={"file": (path.name, body, "application/octet-stream")},
                )
        except httpx.HTTPError as exc:
            raise WorkerApiError(f"upload of {kind.value}/{relative} failed: {exc}") from exc
        if answer.status_code >= 400:
            raise self._fail(answer, f"upload of {kind.value}/{relative}")
