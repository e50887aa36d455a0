"""The user API's upload routes read their multipart body themselves
(``labcloud.storage.http.received_files``): files land whole, by rename, nothing
staged is left behind, and a body over the storage limit is refused."""

from __future__ import annotations

import os
from pathlib import Path

from fastapi.testclient import TestClient

from labcloud.storage.http import UPLOAD_WRITE_SIZE
from labcloud.storage.local import STAGING_FOLDER
from tests.user_api.helpers import login, signup
from user_api.settings import UserApiSettings


def _staged(settings: UserApiSettings) -> list[str]:
    folder = Path(settings.user_data_root_path) / STAGING_FOLDER
    return os.listdir(folder) if folder.exists() else []


def test_a_large_upload_lands_whole(client: TestClient, user_settings: UserApiSettings) -> None:
    ada = signup(client, "ada@example.org")
    content = os.urandom(2 * UPLOAD_WRITE_SIZE + 1)
    stored = client.post(
        "/files/data/run/upload",
        files=[("file", ("big.bin", content)), ("file", ("sub/small.txt", b"small"))],
        headers=ada,
    )
    assert stored.status_code == 201, stored.text
    assert [f["size_bytes"] for f in stored.json()["files"]] == [len(content), 5]
    assert client.get("/files/data/run/big.bin/download", headers=ada).content == content
    assert client.get("/files/data/run/sub/small.txt/download", headers=ada).content == b"small"
    assert _staged(user_settings) == []


def test_an_upload_over_the_whole_limit_is_refused_and_not_kept(
    client: TestClient, user_settings: UserApiSettings
) -> None:
    ada = signup(client, "ada@example.org")
    admin = login(client, "admin@example.org")
    limits = client.put(
        "/admin/users/ada@example.org/limits", json={"max_storage_bytes": 1000}, headers=admin
    )
    assert limits.status_code == 200, limits.text
    refused = client.post("/files/data/upload", files={"file": ("a.bin", b"x" * 5000)}, headers=ada)
    assert refused.status_code == 413
    assert refused.json()["detail"] == (
        "storage limit reached: this upload is larger than your whole storage limit "
        "of 1,000 bytes; it was not kept"
    )
    assert client.get("/files/data/a.bin", headers=ada).status_code == 404
    assert _staged(user_settings) == []


def test_a_body_that_is_not_a_form_of_files_is_refused(client: TestClient) -> None:
    ada = signup(client, "ada@example.org")
    not_multipart = client.post("/files/data/upload", json={"file": "a"}, headers=ada)
    assert not_multipart.status_code == 400
    assert "multipart/form-data" in not_multipart.json()["detail"]
    no_file = client.post("/files/data/upload", files={"other": ("a", b"x")}, headers=ada)
    assert no_file.status_code == 400
    assert "multipart field 'file'" in no_file.json()["detail"]


def test_an_unauthenticated_upload_is_refused(client: TestClient) -> None:
    refused = client.post("/files/data/upload", files={"file": ("a.bin", b"x")})
    assert refused.status_code == 401


def test_the_upload_routes_document_their_body(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    for path in ("/files/{type}/{path}/upload", "/_signed/{token}"):
        body = schema["paths"][path]["post"]["requestBody"]
        form = body["content"]["multipart/form-data"]["schema"]
        assert form["required"] == ["file"]
        assert form["properties"]["file"]["items"] == {"type": "string", "format": "binary"}
