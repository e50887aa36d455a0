"""The user API's routes a user's commands call, one method per route, over HTTP.

Files move in streams of ``CHUNK`` bytes both ways: an upload's multipart body is
written from the open file as it is sent, a download is written to disk as it
arrives, so neither is ever held in memory whole."""

from __future__ import annotations

import codecs
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import httpx

from labcloud_cli.api import ApiClient, detail
from labcloud_cli.errors import NotLoggedIn, Refused
from labcloud_cli.user.credentials import Login

Json = dict[str, Any]
CHUNK = 256 * 1024
# Calls that wait on the server (a job's status, a log stream) may take this much
# longer than the wait they ask for before the client gives up on the answer.
WAIT_MARGIN = 30.0
Progress = Callable[[int], None]
"""Told the bytes moved since it was last told."""


class LogsUnavailable(Refused):
    """The server has no live-log route (an older user API)."""


@dataclass(frozen=True)
class LogPage:
    text: bytes
    next_offset: int
    complete: bool


def _path(path: str) -> str:
    return quote(path.strip("/"), safe="/")


class UserClient(ApiClient):
    """One user's requests to one user API."""

    def __init__(self, url: str, *, timeout: float) -> None:
        super().__init__(url, timeout=timeout)
        self.url = url
        self.timeout = timeout

    # -- signing in -------------------------------------------------------------------

    def use(self, login: Login) -> None:
        self._http.headers["Authorization"] = f"Bearer {login.id_token}"

    def access_info(self) -> Json:
        info: Json = self.call("GET", "/access_info")
        return info

    def token(self, token_url: str, email: str, password: str) -> tuple[str, int]:
        """An ID token and its lifetime in seconds from the server's token route."""
        response = self._http.post(token_url, data={"username": email, "password": password})
        if response.status_code in (401, 403):
            raise NotLoggedIn(f"login as {email} refused: {detail(response)}")
        if response.status_code != 201:
            raise Refused(f"login as {email} failed: {detail(response)}")
        answer = response.json()
        return str(answer["id_token"]), int(answer["expires_in"])

    def log_in(self, email: str, password: str) -> Login:
        """Log in as ``email`` the way ``/access_info`` offers; the token is then
        sent with every request."""
        info = self.access_info()
        token_url = info.get("token_url")
        cognito = info.get("cognito") or {}
        if token_url:
            id_token, lifetime = self.token(str(token_url), email, password)
        elif cognito.get("user_pool_id") and cognito.get("client_id"):
            id_token, lifetime = cognito_login(cognito, email, password)
        else:
            raise Refused(f"{self.url} offers no way to log in (no token route, no Cognito pool)")
        expires_at = datetime.now(UTC) + timedelta(seconds=lifetime)
        login = Login(self.url, email, id_token, expires_at.isoformat())
        self.use(login)
        return login

    # -- plain JSON routes ------------------------------------------------------------

    def call(
        self, method: str, path: str, *, json_body: Any = None, params: dict[str, Any] | None = None
    ) -> Any:
        return self._decoded(self._send(method, path, json_body=json_body, params=params))

    def _send(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        query = {key: value for key, value in (params or {}).items() if value is not None}
        return self._http.request(
            method,
            path,
            json=json_body,
            params=query,
            timeout=timeout if timeout is not None else self.timeout,
        )

    def _decoded(self, response: httpx.Response) -> Any:
        self._check(response)
        return None if response.status_code == 204 else response.json()

    def _check(self, response: httpx.Response) -> None:
        if response.status_code == 401:
            raise NotLoggedIn(
                f"{self.url} refused your login ({detail(response)}); "
                f"log in again: labcloud login --url {self.url}"
            )
        if response.is_error:
            raise Refused(detail(response))

    def user(self) -> Json:
        me: Json = self.call("GET", "/user")
        return me

    def applications(self) -> Json:
        catalog: Json = self.call("GET", "/jobs/applications")
        return catalog

    def list_files(self, path: str, *, recursive: bool = False) -> list[Json]:
        entries: list[Json] = self.call(
            "GET", f"/files/{_path(path)}", params={"recursive": str(recursive).lower()}
        )
        return entries

    def jobs(self, *, statuses: list[str] | None = None, limit: int = 100) -> list[Json]:
        params: dict[str, Any] = {"limit": limit}
        if statuses:
            params["status"] = statuses
        jobs: list[Json] = self.call("GET", "/jobs", params=params)
        return jobs

    def all_jobs(self) -> Iterator[Json]:
        """Every job, newest first, a page at a time."""
        offset, page = 0, 1000
        while True:
            jobs: list[Json] = self.call("GET", "/jobs", params={"offset": offset, "limit": page})
            yield from jobs
            if len(jobs) < page:
                return
            offset += page

    def job(self, job_id: int, *, wait: float = 0, known: str | None = None) -> Json:
        """A job; with ``wait``, as soon as its status is no longer ``known`` (or
        when the wait ends)."""
        params = {"wait": wait or None, "status": known if wait else None}
        job: Json = self._decoded(
            self._send("GET", f"/jobs/{job_id}", params=params, timeout=wait + WAIT_MARGIN)
        )
        return job

    def create_job(self, body: Json) -> Json:
        job: Json = self.call("POST", "/jobs", json_body=body)
        return job

    def cancel_job(self, job_id: int) -> Json:
        job: Json = self.call("POST", f"/jobs/{job_id}/cancel")
        return job

    def delete_job(self, job_id: int) -> None:
        self.call("DELETE", f"/jobs/{job_id}")

    # -- live logs --------------------------------------------------------------------

    def _logs_check(self, response: httpx.Response) -> None:
        # The job itself was found before its log is asked for: a 404 here means the
        # route is missing (a user API from before live logs), not the job.
        if response.status_code in (404, 405):
            raise LogsUnavailable(f"live logs are not available from {self.url}")
        self._check(response)

    def log_page(self, job_id: int, offset: int) -> LogPage:
        response = self._send("GET", f"/jobs/{job_id}/logs", params={"offset": offset})
        self._logs_check(response)
        next_offset = int(response.headers.get("X-Log-Next-Offset", offset + len(response.content)))
        complete = response.headers.get("X-Log-Complete", "false").lower() == "true"
        return LogPage(response.content, next_offset, complete)

    @contextmanager
    def log_stream(self, job_id: int, offset: int) -> Iterator[Iterator[bytes]]:
        """The job's log from ``offset``, then new bytes as they come, until the job
        ends or the server closes the stream."""
        request = self._http.build_request(
            "GET",
            f"/jobs/{job_id}/logs",
            params={"follow": "true", "offset": offset},
            timeout=httpx.Timeout(self.timeout, read=None),
        )
        response = self._http.send(request, stream=True)
        try:
            if response.is_error:
                response.read()
                self._logs_check(response)
            # Without a chunk size: each piece as it arrives (a size would hold
            # lines back until that many bytes came).
            yield response.iter_bytes()
        finally:
            response.close()

    # -- files ------------------------------------------------------------------------

    def upload(self, source: Path, remote: str, progress: Progress) -> Json:
        """Store the local file ``source`` as ``remote`` (``data/run1/a.tif``)."""
        folder, _, name = remote.strip("/").rpartition("/")
        area, _, sub = folder.partition("/")
        if not area or not name:
            raise Refused(f"{remote!r}: give an area and a file name (e.g. data/{source.name})")
        if any(c in name for c in '\r\n"\\'):
            raise Refused(
                f"{source}: file names with quotes, backslashes or line breaks are refused"
            )
        boundary = secrets.token_hex(16)
        head = (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        size = source.stat().st_size
        with source.open("rb") as handle:
            route = f"/files/{_path(area)}/{_path(sub) + '/' if sub else ''}upload"
            response = self._http.post(
                route,
                content=_multipart(head, handle, tail, progress),
                headers={
                    "Content-Type": f"multipart/form-data; boundary={boundary}",
                    "Content-Length": str(len(head) + size + len(tail)),
                },
                timeout=httpx.Timeout(self.timeout, write=None, read=None),
            )
        stored: Json = self._decoded(response)
        return stored

    @contextmanager
    def stream_file(self, remote: str) -> Iterator[Iterator[bytes]]:
        """The file (a folder: a zip of it) ``remote``, in chunks as they arrive."""
        request = self._http.build_request(
            "GET",
            f"/files/{_path(remote)}/download",
            timeout=httpx.Timeout(self.timeout, read=None),
        )
        response = self._http.send(request, stream=True)
        try:
            if response.is_error:
                response.read()
                self._check(response)
            yield response.iter_bytes(CHUNK)
        finally:
            response.close()

    def download(self, remote: str, target: Path, progress: Progress) -> int:
        """Write ``remote`` to ``target`` as it arrives, through a temporary file
        beside it (a download cut short leaves no file that looks whole); the bytes
        written."""
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.part")
        written = 0
        with self.stream_file(remote) as chunks, partial.open("wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
                written += len(chunk)
                progress(len(chunk))
        partial.replace(target)
        return written


def _multipart(head: bytes, handle: BinaryIO, tail: bytes, progress: Progress) -> Iterator[bytes]:
    yield head
    while chunk := handle.read(CHUNK):
        yield chunk
        progress(len(chunk))
    yield tail


def cognito_login(cognito: Json, email: str, password: str) -> tuple[str, int]:
    """Log in straight at the Cognito pool the server names (a server without a
    token route): its ID token and lifetime in seconds."""
    import boto3  # only for this way of logging in: boto3 takes a while to import
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client("cognito-idp", region_name=cognito.get("region") or None)
    try:
        answer = client.initiate_auth(
            AuthFlow="USER_PASSWORD_AUTH",
            ClientId=cognito["client_id"],
            AuthParameters={"USERNAME": email, "PASSWORD": password},
        )
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        message = exc.response.get("Error", {}).get("Message", str(exc))
        if code in ("NotAuthorizedException", "UserNotFoundException"):
            raise NotLoggedIn(f"login as {email} refused: {message}") from exc
        raise Refused(f"login as {email} failed at Cognito: {message}") from exc
    except BotoCoreError as exc:
        raise Refused(f"cannot reach Cognito: {exc}") from exc
    result = answer.get("AuthenticationResult")
    if not result:
        challenge = answer.get("ChallengeName", "a challenge")
        raise Refused(
            f"Cognito asks for {challenge} before {email} may log in; finish it in the "
            "web app first"
        )
    return str(result["IdToken"]), int(result["ExpiresIn"])


class Utf8Writer:
    """Bytes of a log, written out as text as they come: a character cut in two by
    a chunk boundary waits for its other half."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._write = write

    def __call__(self, data: bytes) -> None:
        text = self._decoder.decode(data)
        if text:
            self._write(text)

    def flush(self) -> None:
        text = self._decoder.decode(b"", final=True)
        if text:
            self._write(text)
