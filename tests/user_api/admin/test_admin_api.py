"""The admin routes through the user API app, on SQLite and PostgreSQL: who may
call them, what each one does, and the audit entry each change leaves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from labcloud.contract import Group
from tests.user_api.helpers import PASSWORD, login, signup
from user_api.admin.service import WORKER_EMAIL_DOMAIN
from user_api.app import create_app
from user_api.models import AuditEntry, WorkerOutbox
from user_api.settings import UserApiSettings
from worker_runner.settings import load_settings

ADMIN = "admin@example.org"
APP = {"application": "demo", "version": "latest", "entrypoint": "wordcount"}


def _upload(
    client: TestClient, headers: dict[str, str], folder: str, name: str, data: bytes
) -> Any:
    return client.post(f"/files/{folder}/upload", files={"file": (name, data)}, headers=headers)


def start_job(client: TestClient, headers: dict[str, str], name: str, **extra: Any) -> int:
    """A queued job of the demo application reading data/set/."""
    assert _upload(client, headers, "data/set", "a.txt", b"one two").status_code == 201
    body = {
        "job_name": name,
        "application": APP,
        "attributes": {"files_down": {"data_ids": ["set"]}},
    }
    response = client.post("/jobs", json={**body, **extra}, headers=headers)
    assert response.status_code == 201, response.text
    job_id: int = response.json()["id"]
    return job_id


def audit_entries(client: TestClient) -> list[AuditEntry]:
    with client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        return list(session.scalars(select(AuditEntry).order_by(AuditEntry.id)))


@pytest.fixture
def admin(client: TestClient) -> dict[str, str]:
    return login(client, ADMIN)


def test_every_admin_route_is_for_admins_only(client: TestClient, admin: dict[str, str]) -> None:
    ada = signup(client, "ada@example.org")
    job_id = start_job(client, ada, "job-1")
    created = client.post(
        "/user",
        data={"username": "w@example.org", "password": PASSWORD, "groups": ["workers"]},
        headers=admin,
    )
    assert created.status_code == 201
    worker = login(client, "w@example.org")
    routes: list[tuple[str, str, dict[str, Any] | None, int]] = [
        ("GET", "/admin/users", None, 200),
        ("GET", "/admin/users?search=ada&status=active&offset=0&limit=5", None, 200),
        ("POST", "/admin/users/ada@example.org/approve", None, 200),
        ("POST", "/admin/users/ada@example.org/disable", None, 200),
        ("POST", "/admin/users/ada@example.org/enable", None, 200),
        ("PUT", "/admin/users/ada@example.org/groups", {"groups": ["users"]}, 200),
        ("PUT", "/admin/users/ada@example.org/limits", {"max_active_jobs": 5}, 200),
        ("POST", "/admin/workers", {"name": "gpu-box-1"}, 201),
        ("GET", "/admin/queue", None, 200),
        ("GET", "/admin/jobs?status=queued&user=ada@example.org", None, 200),
        ("POST", f"/admin/jobs/{job_id}/cancel", None, 200),
        ("GET", "/admin/catalog", None, 200),
        ("GET", "/admin/audit?offset=0&limit=10", None, 200),
    ]
    for method, path, body, _ in routes:
        anonymous = client.request(method, path, json=body)
        assert anonymous.status_code == 401, (method, path, anonymous.text)
        for caller in (ada, worker):
            refused = client.request(method, path, json=body, headers=caller)
            assert refused.status_code == 403, (method, path, refused.text)
            assert refused.json()["detail"] == "this route needs an account in group 'admins'"
    # Nothing the refused calls asked for happened.
    assert audit_entries(client) == []
    assert client.get("/jobs", headers=ada).json()[0]["status"] == "queued"
    for method, path, body, expected in routes:
        response = client.request(method, path, json=body, headers=admin)
        assert response.status_code == expected, (method, path, response.text)


def test_list_users_with_usage_search_and_status(
    client: TestClient, admin: dict[str, str], user_settings: UserApiSettings
) -> None:
    ada = signup(client, "ada@example.org")
    signup(client, "bob@example.org")
    assert _upload(client, ada, "config", "params.yaml", b"x" * 1500).status_code == 201
    start_job(client, ada, "job-1")  # uploads 7 more bytes
    users = client.get("/admin/users", headers=admin).json()
    assert [user["email"] for user in users] == [ADMIN, "ada@example.org", "bob@example.org"]
    row = users[1]
    assert row["groups"] == ["users"]
    assert row["status"] == "active"
    assert (row["is_active"], row["is_approved"]) == (True, True)
    assert row["active_jobs"] == 1
    assert row["bytes_stored"] == 1507
    assert row["own_limits"] == {"max_active_jobs": None, "max_storage_bytes": None}
    assert row["limits"] == {
        "max_active_jobs": user_settings.default_max_active_jobs,
        "max_storage_bytes": user_settings.default_max_storage_bytes,
    }
    assert row["created_at"]
    assert users[2]["active_jobs"] == 0
    assert users[2]["bytes_stored"] == 0

    def emails(query: str) -> list[str]:
        response = client.get(f"/admin/users?{query}", headers=admin)
        assert response.status_code == 200, response.text
        return [user["email"] for user in response.json()]

    assert emails("search=ADA") == ["ada@example.org"]
    assert emails("search=%25") == []  # LIKE wildcards are matched literally
    assert emails("search=example.org&offset=1&limit=1") == ["ada@example.org"]
    assert client.post("/admin/users/bob@example.org/disable", headers=admin).status_code == 200
    assert emails("status=disabled") == ["bob@example.org"]
    assert emails("status=active") == [ADMIN, "ada@example.org"]
    assert emails("status=pending") == []
    assert client.get("/admin/users?status=gone", headers=admin).status_code == 422


def test_approval_flow(user_settings: UserApiSettings) -> None:
    settings = user_settings.model_copy(update={"signup_requires_approval": True})
    with TestClient(create_app(settings)) as client:
        admin = login(client, ADMIN)
        ada = signup(client, "ada@example.org")  # signing up and logging in work
        for method, path in (("GET", "/user"), ("GET", "/jobs"), ("GET", "/files/")):
            waiting = client.request(method, path, headers=ada)
            assert waiting.status_code == 403, path
            assert waiting.json()["detail"] == (
                "your account is waiting for an administrator's approval"
            )
        pending = client.get("/admin/users?status=pending", headers=admin).json()
        assert [(u["email"], u["status"], u["is_approved"]) for u in pending] == [
            ("ada@example.org", "pending", False)
        ]
        # Accounts an admin creates need no approval.
        created = client.post(
            "/user", data={"username": "bob@example.org", "password": PASSWORD}, headers=admin
        )
        assert created.status_code == 201
        assert client.get("/user", headers=login(client, "bob@example.org")).status_code == 200

        approved = client.post("/admin/users/Ada@Example.org/approve", headers=admin)
        assert approved.status_code == 200, approved.text
        assert approved.json()["status"] == "active"
        # The same token works at once: approval is read from the database.
        assert client.get("/user", headers=ada).status_code == 200
        again = client.post("/admin/users/ada@example.org/approve", headers=admin)
        assert again.status_code == 200
        [entry] = audit_entries(client)
        assert (entry.actor, entry.action, entry.target) == (
            ADMIN,
            "approve_user",
            "ada@example.org",
        )
        missing = client.post("/admin/users/nobody@example.org/approve", headers=admin)
        assert missing.status_code == 404
        assert "nobody@example.org" in missing.json()["detail"]


def test_disable_stops_tokens_at_once_and_enable_restores(
    client: TestClient, admin: dict[str, str]
) -> None:
    ada = signup(client, "ada@example.org")
    disabled = client.post("/admin/users/ada@example.org/disable", headers=admin)
    assert disabled.status_code == 200
    assert disabled.json()["status"] == "disabled"
    refused = client.get("/user", headers=ada)
    assert refused.status_code == 401
    assert refused.json()["detail"] == "This account is disabled."
    token = client.post("/token", data={"username": "ada@example.org", "password": PASSWORD})
    assert token.status_code == 401
    # Disabling twice changes nothing and records nothing more.
    assert client.post("/admin/users/ada@example.org/disable", headers=admin).status_code == 200
    enabled = client.post("/admin/users/ada@example.org/enable", headers=admin)
    assert enabled.json()["status"] == "active"
    assert client.get("/user", headers=ada).status_code == 200
    assert [(e.action, e.target) for e in audit_entries(client)] == [
        ("disable_user", "ada@example.org"),
        ("enable_user", "ada@example.org"),
    ]


def test_groups_change_applies_at_once_and_keeps_an_admin(
    client: TestClient, admin: dict[str, str]
) -> None:
    ada = signup(client, "ada@example.org")
    assert client.get("/admin/users", headers=ada).status_code == 403
    changed = client.put(
        "/admin/users/ada@example.org/groups",
        json={"groups": ["admins", "users", "admins"]},
        headers=admin,
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["groups"] == ["admins", "users"]
    assert client.get("/admin/users", headers=ada).status_code == 200
    [entry] = audit_entries(client)
    assert (entry.action, entry.target, entry.details) == (
        "set_groups",
        "ada@example.org",
        {"from": ["users"], "to": ["admins", "users"]},
    )
    bad_bodies: list[dict[str, Any]] = [
        {"groups": ["wizards"]},
        {"groups": []},
        {"groups": "users"},
        {},
    ]
    for body in bad_bodies:
        bad = client.put("/admin/users/ada@example.org/groups", json=body, headers=admin)
        assert bad.status_code == 422, body

    # Two admins: either may lose the group, not both.
    demoted = client.put(
        f"/admin/users/{ADMIN}/groups", json={"groups": [Group.USERS.value]}, headers=ada
    )
    assert demoted.status_code == 200
    last = client.put(
        "/admin/users/ada@example.org/groups", json={"groups": ["users"]}, headers=ada
    )
    assert last.status_code == 409
    assert "last active admin" in last.json()["detail"]
    assert client.post("/admin/users/ada@example.org/disable", headers=ada).status_code == 409
    assert client.get("/admin/users", headers=ada).status_code == 200
    assert client.get("/admin/users", headers=admin).status_code == 403
    assert len(audit_entries(client)) == 2


def test_limits_are_set_partially_and_reset_to_the_default(
    client: TestClient, admin: dict[str, str], user_settings: UserApiSettings
) -> None:
    signup(client, "ada@example.org")
    url = "/admin/users/ada@example.org/limits"
    both = client.put(url, json={"max_active_jobs": 3, "max_storage_bytes": 1000}, headers=admin)
    assert both.status_code == 200
    assert both.json()["own_limits"] == {"max_active_jobs": 3, "max_storage_bytes": 1000}
    assert both.json()["limits"] == {"max_active_jobs": 3, "max_storage_bytes": 1000}
    jobs_only = client.put(url, json={"max_active_jobs": None}, headers=admin).json()
    assert jobs_only["own_limits"] == {"max_active_jobs": None, "max_storage_bytes": 1000}
    assert jobs_only["limits"]["max_active_jobs"] == user_settings.default_max_active_jobs
    assert client.put(url, json={}, headers=admin).status_code == 200  # nothing to change
    for body in ({"max_active_jobs": -1}, {"max_storage_bytes": "lots"}, {"max_jobs": 1}):
        assert client.put(url, json=body, headers=admin).status_code == 422, body
    missing = client.put("/admin/users/x@example.org/limits", json={}, headers=admin)
    assert missing.status_code == 404
    assert [(e.action, e.details) for e in audit_entries(client)] == [
        (
            "set_limits",
            {
                "from": {"max_active_jobs": None, "max_storage_bytes": None},
                "to": {"max_active_jobs": 3, "max_storage_bytes": 1000},
            },
        ),
        (
            "set_limits",
            {
                "from": {"max_active_jobs": 3, "max_storage_bytes": 1000},
                "to": {"max_active_jobs": None, "max_storage_bytes": 1000},
            },
        ),
    ]


def test_create_worker_returns_usable_runner_settings(
    client: TestClient, admin: dict[str, str], user_settings: UserApiSettings, tmp_path: Path
) -> None:
    response = client.post("/admin/workers", json={"name": "gpu-box-1"}, headers=admin)
    assert response.status_code == 201, response.text
    created = response.json()
    email = f"gpu-box-1@{WORKER_EMAIL_DOMAIN}"
    assert created["email"] == email
    assert created["groups"] == ["workers"]
    values = created["settings"]
    assert values["API_URL"] == user_settings.workerfacing_api_url
    assert values["AUTH_URL"] == user_settings.public_url
    assert values["USERNAME"] == email
    assert float(values["TIMEOUT_STATUS"]) > 0
    # The env file is one the runner reads as is, and its account logs in.
    env_file = tmp_path / "worker.env"
    env_file.write_text(created["env_file"])
    runner = load_settings(env_file)
    assert (runner.api_url, runner.auth_url) == (values["API_URL"], values["AUTH_URL"])
    assert runner.username == email
    assert runner.password.get_secret_value() == values["PASSWORD"]
    token = client.post("/token", data={"username": email, "password": values["PASSWORD"]})
    assert token.status_code == 201
    worker = {"Authorization": f"Bearer {token.json()['id_token']}"}
    assert client.get("/jobs", headers=worker).status_code == 403  # a worker, not a user

    cloud = client.post("/admin/workers", json={"name": "aws_1", "cloud": True}, headers=admin)
    assert cloud.json()["groups"] == ["cloud", "workers"]
    again = client.post("/admin/workers", json={"name": "gpu-box-1"}, headers=admin)
    assert again.status_code == 409
    for name in ("", "-x", "a b", "a@b", "x" * 64, "a.b"):
        bad = client.post("/admin/workers", json={"name": name}, headers=admin)
        assert bad.status_code == 422, name

    entries = audit_entries(client)
    assert [(e.action, e.target, e.details) for e in entries] == [
        ("create_worker", email, {"groups": ["workers"]}),
        ("create_worker", f"aws_1@{WORKER_EMAIL_DOMAIN}", {"groups": ["cloud", "workers"]}),
    ]
    assert values["PASSWORD"] not in json.dumps([e.details for e in entries])
    assert values["PASSWORD"] not in client.get("/admin/audit", headers=admin).text


def test_queue_overview_jobs_and_cancel(client: TestClient, admin: dict[str, str]) -> None:
    empty = client.get("/admin/queue", headers=admin).json()
    assert empty["oldest_queued"] is None
    assert set(empty["by_status"].values()) == {0}
    assert empty["by_environment"] == {} == empty["by_application"]

    ada = signup(client, "ada@example.org")
    bob = signup(client, "bob@example.org")
    first = start_job(client, ada, "first")
    second = start_job(client, bob, "second", environment="local")
    third = start_job(client, bob, "third", environment="cloud")
    assert client.post(f"/jobs/{third}/cancel", headers=bob).status_code == 200

    overview = client.get("/admin/queue", headers=admin).json()
    assert overview["by_status"]["queued"] == 2
    assert overview["by_status"]["canceled"] == 1
    assert overview["by_status"]["running"] == 0
    assert overview["by_environment"] == {
        "any": {"queued": 1, "running": 0},
        "local": {"queued": 1, "running": 0},
    }
    assert overview["by_application"] == {"demo/latest/wordcount": {"queued": 2, "running": 0}}
    oldest = overview["oldest_queued"]
    assert (oldest["id"], oldest["owner"], oldest["job_name"]) == (
        first,
        "ada@example.org",
        "first",
    )
    assert 0 <= oldest["age_seconds"] < 60

    def ids(query: str) -> list[int]:
        response = client.get(f"/admin/jobs?{query}", headers=admin)
        assert response.status_code == 200, response.text
        return [job["id"] for job in response.json()]

    assert ids("") == [third, second, first]
    assert ids("user=BOB@example.org") == [third, second]
    assert ids("status=queued") == [second, first]
    assert ids("status=queued&user=bob@example.org&limit=1") == [second]
    assert client.get("/admin/jobs?user=x@example.org", headers=admin).status_code == 404
    listed = client.get("/admin/jobs?limit=1", headers=admin).json()[0]
    assert listed["owner"] == "bob@example.org"
    assert listed["application"] == "demo/latest/wordcount"
    assert listed["environment"] == "cloud"

    canceled = client.post(f"/admin/jobs/{first}/cancel", headers=admin)
    assert canceled.status_code == 200, canceled.text
    assert canceled.json()["status"] == "canceled"
    assert client.get(f"/jobs/{first}", headers=ada).json()["status"] == "canceled"
    with client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        # Never delivered to the worker API: withdrawing the enqueue is enough.
        pending = {row.job_id for row in session.scalars(select(WorkerOutbox))}
    assert first not in pending
    # Canceling an ended job is refused and changes nothing.
    assert client.post(f"/admin/jobs/{first}/cancel", headers=admin).status_code == 409
    assert client.post("/admin/jobs/999/cancel", headers=admin).status_code == 404
    [entry] = audit_entries(client)
    assert (entry.action, entry.target) == ("cancel_job", f"job {first}")
    assert entry.details == {
        "owner": "ada@example.org",
        "job_name": "first",
        "status_before": "queued",
    }


def test_catalog_status(
    client: TestClient, admin: dict[str, str], user_settings: UserApiSettings
) -> None:
    status = client.get("/admin/catalog", headers=admin).json()
    assert status["path"] == str(user_settings.application_config_file)
    assert status["version"] >= 1
    assert status["loaded_at"]
    assert status["last_error"] is None
    assert status["last_error_at"] is None


def test_audit_log_newest_first_and_never_written_by_reads(
    client: TestClient, admin: dict[str, str]
) -> None:
    signup(client, "ada@example.org")
    signup(client, "bob@example.org")
    for action, email in (("disable", "ada"), ("disable", "bob"), ("enable", "ada")):
        response = client.post(f"/admin/users/{email}@example.org/{action}", headers=admin)
        assert response.status_code == 200
    log = client.get("/admin/audit", headers=admin).json()
    assert [(e["action"], e["target"], e["actor"]) for e in log] == [
        ("enable_user", "ada@example.org", ADMIN),
        ("disable_user", "bob@example.org", ADMIN),
        ("disable_user", "ada@example.org", ADMIN),
    ]
    assert [e["id"] for e in log] == sorted((e["id"] for e in log), reverse=True)
    page = client.get("/admin/audit?offset=1&limit=1", headers=admin).json()
    assert [e["target"] for e in page] == ["bob@example.org"]
    for path in (
        "/admin/users",
        "/admin/queue",
        "/admin/jobs",
        "/admin/catalog",
        "/admin/audit",
    ):
        assert client.get(path, headers=admin).status_code == 200
    assert len(audit_entries(client)) == 3
    # The log offers no way to change it.
    assert client.delete("/admin/audit", headers=admin).status_code == 405
    assert client.put("/admin/audit", json={}, headers=admin).status_code == 405


def test_internal_account_route_for_the_worker_api(
    client: TestClient, admin: dict[str, str], user_settings: UserApiSettings
) -> None:
    signup(client, "ada@example.org")
    subject = client.get("/admin/users?search=ada", headers=admin).json()[0]["subject"]
    key = {"x-api-key": user_settings.internal_api_key_secret.get_secret_value()}
    assert client.get(f"/_accounts/{subject}").status_code == 401
    assert client.get(f"/_accounts/{subject}", headers={"x-api-key": "wrong"}).status_code == 401
    # The storage limit in force comes along, with what the account's files take
    # and what is left: jobs' results count against it.
    default = user_settings.default_max_storage_bytes
    assert client.get(f"/_accounts/{subject}", headers=key).json() == {
        "active": True,
        "max_storage_bytes": default,
        "bytes_used": 0,
        "remaining_storage_bytes": default,
    }
    limits = client.put(
        "/admin/users/ada@example.org/limits", json={"max_storage_bytes": 1234}, headers=admin
    )
    assert limits.status_code == 200, limits.text
    client.post("/admin/users/ada@example.org/disable", headers=admin)
    assert client.get(f"/_accounts/{subject}", headers=key).json() == {
        "active": False,
        "max_storage_bytes": 1234,
        "bytes_used": None,
        "remaining_storage_bytes": None,
    }
    # With local auth, an account that does not exist has no valid tokens.
    assert client.get("/_accounts/deadbeef", headers=key).json()["active"] is False
