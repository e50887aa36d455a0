"""The user API over HTTP, signed in as one account: what every subcommand that talks
to a running LabCloud shares (``labcloud admin`` today, users' commands next)."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

import httpx

from labcloud_cli.errors import Refused


def detail(response: httpx.Response) -> str:
    """The server's explanation of an error answer, on one line."""
    try:
        found = response.json().get("detail")
    except (ValueError, AttributeError):
        return f"HTTP {response.status_code}: {response.text[:500]}"
    if isinstance(found, list):  # request validation: one line per problem
        return "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', [])[1:])}: {item.get('msg')}"
            for item in found
        )
    return str(found) if found else f"HTTP {response.status_code}"


class ApiClient:
    """Requests to one user API; after ``login`` they carry that account's token.

    Raises ``Refused`` for an error answer and lets ``httpx.TransportError`` through
    when the server cannot be reached."""

    def __init__(self, url: str, *, timeout: float) -> None:
        self._http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def login(self, email: str, password: str) -> None:
        response = self._http.post("/token", data={"username": email, "password": password})
        if response.status_code != 201:
            raise Refused(f"login as {email} failed: {detail(response)}")
        self._http.headers["Authorization"] = f"Bearer {response.json()['id_token']}"

    def call(
        self, method: str, path: str, *, json_body: Any = None, params: dict[str, Any] | None = None
    ) -> Any:
        """The decoded JSON answer; query parameters that are None are left out."""
        query = {key: value for key, value in (params or {}).items() if value is not None}
        response = self._http.request(method, path, json=json_body, params=query)
        if response.is_error:
            raise Refused(detail(response))
        return response.json()
