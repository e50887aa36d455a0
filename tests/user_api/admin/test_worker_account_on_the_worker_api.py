"""A worker account created through the admin API serves a real worker API, and
disabling it refuses its token there at once (account check TTL 0), with the user
API and the worker API running as processes on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.stack import ADMIN, Stack

CATALOG = Path(__file__).resolve().parents[2] / "data" / "application_config.yaml"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(tmp_path, CATALOG)
    stack.worker_api.env["ACCOUNT_CHECK_TTL_SECONDS"] = "0"
    try:
        stack.start(runners=0)
        yield stack
    finally:
        stack.stop()


@pytest.mark.e2e
def test_disabled_worker_is_refused_by_the_worker_api(stack: Stack) -> None:
    admin = httpx.Client(base_url=stack.user_url, headers=stack.token(ADMIN), timeout=30)
    created = admin.post("/admin/workers", json={"name": "gpu-box-1"})
    assert created.status_code == 201, created.text
    settings = created.json()["settings"]
    assert settings["API_URL"] == stack.worker_url
    assert settings["AUTH_URL"] == stack.user_url
    token = httpx.post(
        f"{settings['AUTH_URL']}/token",
        data={"username": settings["USERNAME"], "password": settings["PASSWORD"]},
    )
    assert token.status_code == 201, token.text
    worker = httpx.Client(
        base_url=settings["API_URL"],
        headers={"Authorization": f"Bearer {token.json()['id_token']}"},
        timeout=30,
    )
    pull = {"memory": 1024, "cpu_cores": 1}
    assert worker.get("/jobs", params=pull).json() == {}, stack.logs()

    email = settings["USERNAME"]
    assert admin.post(f"/admin/users/{email}/disable").status_code == 200
    refused = worker.get("/jobs", params=pull)
    assert refused.status_code == 401, refused.text
    assert refused.json()["detail"] == "This account is disabled."

    assert admin.post(f"/admin/users/{email}/enable").status_code == 200
    assert worker.get("/jobs", params=pull).status_code == 200
    admin.close()
    worker.close()
