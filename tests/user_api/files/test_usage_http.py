"""The files routes keep the account's storage count (``user_api.files.usage``):
what the internal account route reports follows uploads and deletions made over
HTTP, and an account at its limit gets no upload URL."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.user_api.helpers import login, signup
from user_api.models import STORAGE_USAGE
from user_api.settings import UserApiSettings


def _state(client: TestClient, settings: UserApiSettings, subject: str) -> dict[str, Any]:
    key = {"x-api-key": settings.internal_api_key_secret.get_secret_value()}
    answer = client.get(f"/_accounts/{subject}", headers=key)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def _counted(client: TestClient) -> int | None:
    app: Any = client.app
    with app.state.session_factory() as session:
        used: int | None = session.scalar(select(STORAGE_USAGE.c.used_bytes))
    return used


def test_the_files_routes_keep_the_count(
    client: TestClient, user_settings: UserApiSettings
) -> None:
    ada = signup(client, "ada@example.org")
    admin = login(client, "admin@example.org")
    subject = client.get("/admin/users?search=ada", headers=admin).json()[0]["subject"]
    limits = {"max_storage_bytes": 100}
    assert (
        client.put("/admin/users/ada@example.org/limits", json=limits, headers=admin).status_code
        == 200
    )
    assert _state(client, user_settings, subject)["bytes_used"] == 0

    def up(name: str, size: int) -> int:
        return client.post(
            "/files/data/set/upload", files={"file": (name, b"x" * size)}, headers=ada
        ).status_code

    assert up("a.bin", 60) == 201
    assert _counted(client) == 60
    assert up("a.bin", 70) == 201  # replaced
    assert _counted(client) == 70
    assert up("b.bin", 31) == 413
    assert up("b.bin", 30) == 201
    assert _state(client, user_settings, subject)["remaining_storage_bytes"] == 0
    at_limit = client.post("/files/data/set/url", headers=ada)
    assert at_limit.status_code == 413
    assert client.delete("/files/data/set/a.bin", headers=ada).status_code == 204
    assert _counted(client) == 30
    url = client.post("/files/data/set/url", headers=ada)
    assert url.status_code == 201
    # The signed upload lands outside the counted routes; the next check recounts.
    assert client.post(url.json()["url"], files={"file": ("c.bin", b"c" * 50)}).status_code == 201
    state = _state(client, user_settings, subject)
    assert (state["bytes_used"], state["remaining_storage_bytes"]) == (80, 20)
