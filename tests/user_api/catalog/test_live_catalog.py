"""A running user API follows edits of its catalog file: a version added, a version
removed while a job of it runs, an invalid file written and then fixed."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from labcloud.contract import INTERNAL_API_KEY_HEADER
from tests.user_api.conftest import TEST_CATALOG
from tests.user_api.helpers import login, signup
from tests.waiting import wait_for
from user_api.app import create_app
from user_api.settings import UserApiSettings


@pytest.fixture
def catalog_file(tmp_path: Path) -> Path:
    path = tmp_path / "catalog" / "application_config.yaml"
    path.parent.mkdir()
    shutil.copy(TEST_CATALOG, path)
    return path


@pytest.fixture
def client(user_settings: UserApiSettings, catalog_file: Path) -> Iterator[TestClient]:
    settings = user_settings.model_copy(update={"application_config_file": catalog_file})
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def edit(path: Path, change: Callable[[dict[str, Any]], None], text: str | None = None) -> None:
    """Apply ``change`` to the catalog in ``path`` (or in ``text``) and write it back."""
    catalog = yaml.safe_load(path.read_text(encoding="utf-8") if text is None else text)
    change(catalog)
    # Written beside and renamed over, as deployment tools do: never half a file.
    draft = path.with_suffix(".draft")
    draft.write_text(yaml.safe_dump(catalog), encoding="utf-8")
    draft.replace(path)


def add_version(name: str) -> Callable[[dict[str, Any]], None]:
    return lambda catalog: catalog["demo"].__setitem__(
        name, copy.deepcopy(catalog["demo"]["latest"])
    )


def test_a_running_server_follows_catalog_edits(
    client: TestClient, catalog_file: Path, user_settings: UserApiSettings
) -> None:
    user = signup(client, "ada@example.org")
    admin = login(client, "admin@example.org")
    upload = client.post("/files/data/upload", files={"file": ("a.txt", b"x")}, headers=user)
    assert upload.status_code == 201, upload.text

    def versions() -> set[str]:
        response = client.get("/jobs/applications", headers=user)
        assert response.status_code == 200, response.text
        return set(response.json()["demo"])

    def submit(name: str, version: str) -> Any:
        return client.post(
            "/jobs",
            json={
                "job_name": name,
                "application": {
                    "application": "demo",
                    "version": version,
                    "entrypoint": "wordcount",
                },
                "attributes": {"files_down": {"data_ids": ["a.txt"]}},
            },
            headers=user,
        )

    assert versions() == {"latest"}

    # A new version is served without a restart.
    edit(catalog_file, add_version("2.0"))
    wait_for(lambda: versions() == {"latest", "2.0"})
    created = submit("on-2.0", "2.0")
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    internal = {INTERNAL_API_KEY_HEADER: user_settings.internal_api_key_secret.get_secret_value()}
    running = {"job_id": job_id, "status": "running", "runtime_details": None}
    assert client.put("/_job_status", json=running, headers=internal).status_code == 200

    # Removed while its job runs: new jobs of it are refused, the old one lives on.
    edit(catalog_file, lambda c: c["demo"].pop("2.0"))
    wait_for(lambda: versions() == {"latest"})
    refused = submit("on-2.0-again", "2.0")
    assert refused.status_code in (400, 404, 422), refused.text
    assert "2.0" in refused.json()["detail"]
    listed = client.get("/jobs", headers=user)
    assert listed.status_code == 200
    assert [job["id"] for job in listed.json()] == [job_id]
    finished = {"job_id": job_id, "status": "finished", "runtime_details": "exit 0"}
    assert client.put("/_job_status", json=finished, headers=internal).status_code == 200
    assert client.get(f"/jobs/{job_id}", headers=user).json()["status"] == "finished"

    # An invalid file leaves the last good catalog in force and says what is wrong.
    good = catalog_file.read_text(encoding="utf-8")
    catalog_file.write_text(good.replace("timeout: 600", "timeout: -5"), encoding="utf-8")
    status = wait_for(
        lambda: (s := client.get("/admin/catalog", headers=admin).json())["last_error"] and s
    )
    assert "timeout" in status["last_error"]
    assert str(catalog_file) in status["last_error"]
    assert "line" in status["last_error"]
    assert versions() == {"latest"}
    assert submit("still-works", "latest").status_code == 201

    # Fixing the file clears the error and applies the fix.
    edit(catalog_file, add_version("3.0"), text=good)
    wait_for(lambda: versions() == {"latest", "3.0"})
    assert client.get("/admin/catalog", headers=admin).json()["last_error"] is None
