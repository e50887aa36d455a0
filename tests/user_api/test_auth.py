from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from fastapi.testclient import TestClient

from labcloud.auth.local import LocalTokenIssuer, generate_private_key_pem
from labcloud.db import create_db_engine
from tests.user_api.helpers import PASSWORD, login, signup


def test_signup_token_and_whoami(client: TestClient) -> None:
    headers = signup(client, "Ada@Example.org")
    me = client.get("/user", headers=headers)
    assert me.status_code == 200
    assert me.json() == {"email": "Ada@example.org", "groups": ["users"]}


def test_signup_refuses_duplicates_and_weak_passwords(client: TestClient) -> None:
    signup(client, "ada@example.org")
    again = client.post("/user", data={"username": "ada@example.org", "password": PASSWORD})
    assert again.status_code == 409
    weak = client.post("/user", data={"username": "bob@example.org", "password": "short"})
    assert weak.status_code == 400
    assert "8 characters" in weak.json()["detail"]
    bad_email = client.post("/user", data={"username": "not-an-email", "password": PASSWORD})
    assert bad_email.status_code == 400


def test_anonymous_cannot_create_workers_or_admins(client: TestClient) -> None:
    response = client.post(
        "/user", data={"username": "w@example.org", "password": PASSWORD, "groups": ["workers"]}
    )
    assert response.status_code == 403
    assert (
        client.post("/token", data={"username": "w@example.org", "password": PASSWORD}).status_code
        == 401
    )


def test_admin_creates_worker_account(client: TestClient) -> None:
    admin = login(client, "admin@example.org")
    response = client.post(
        "/user",
        data={"username": "w@example.org", "password": PASSWORD, "groups": ["workers"]},
        headers=admin,
    )
    assert response.status_code == 201
    assert response.json()["groups"] == ["workers"]
    worker = login(client, "w@example.org")
    # A worker is not a user: user routes answer 403.
    assert client.get("/jobs", headers=worker).status_code == 403


def test_plain_user_cannot_create_accounts(client: TestClient) -> None:
    headers = signup(client, "ada@example.org")
    response = client.post(
        "/user", data={"username": "x@example.org", "password": PASSWORD}, headers=headers
    )
    assert response.status_code == 403


def test_signup_disabled(client: TestClient) -> None:
    client.app.state.settings.allow_self_signup = False  # type: ignore[attr-defined]
    response = client.post("/user", data={"username": "a@example.org", "password": PASSWORD})
    assert response.status_code == 403
    assert "self-signup is disabled" in response.json()["detail"].lower()


def test_wrong_password(client: TestClient) -> None:
    signup(client, "ada@example.org")
    response = client.post("/token", data={"username": "ada@example.org", "password": "nope-123"})
    assert response.status_code == 401


@pytest.mark.parametrize(
    "header",
    [
        {},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer not-a-jwt"},
    ],
)
def test_bad_credentials_are_401(client: TestClient, header: dict[str, str]) -> None:
    response = client.get("/user", headers=header)
    assert response.status_code == 401
    assert response.json()["detail"]


def test_token_signed_by_another_key_is_rejected(client: TestClient) -> None:
    signup(client, "ada@example.org")
    other = LocalTokenIssuer(generate_private_key_pem(), lifetime_seconds=60)
    forged = other.issue(subject="x", email="ada@example.org", groups=["users", "admins"])
    response = client.get("/user", headers={"Authorization": f"Bearer {forged}"})
    assert response.status_code == 401


def test_expired_token_is_rejected(client: TestClient) -> None:
    headers = signup(client, "ada@example.org")
    token = headers["Authorization"].split()[1]
    claims = jwt.decode(token, options={"verify_signature": False})
    issuer: LocalTokenIssuer = client.app.state.issuer  # type: ignore[attr-defined]
    expired = jwt.encode(
        {**claims, "exp": int(time.time()) - 60, "iat": int(time.time()) - 120},
        issuer._private_key,
        algorithm="EdDSA",
        headers={"kid": issuer.key_id},
    )
    response = client.get("/user", headers={"Authorization": f"Bearer {expired}"})
    assert response.status_code == 401
    assert "expired" in response.json()["detail"]


def test_alg_none_token_is_rejected(client: TestClient) -> None:
    signup(client, "ada@example.org")
    unsigned = jwt.encode(
        {"sub": "x", "iss": "labcloud", "aud": "labcloud", "exp": int(time.time()) + 60},
        key="",
        algorithm="none",
    )
    response = client.get("/user", headers={"Authorization": f"Bearer {unsigned}"})
    assert response.status_code == 401


def test_login_cookie_authenticates(client: TestClient) -> None:
    signup(client, "ada@example.org")
    response = client.post("/login", data={"username": "ada@example.org", "password": PASSWORD})
    assert response.status_code == 200
    assert "httponly" in response.headers["set-cookie"].lower()
    assert client.get("/user").status_code == 200


def test_access_info_and_jwks(client: TestClient) -> None:
    info = client.get("/access_info").json()
    assert info["cognito"] == {"user_pool_id": None, "client_id": None, "region": None}
    assert info["auth"] == "local"
    keys = client.get("/.well-known/jwks.json").json()["keys"]
    assert keys[0]["kty"] == "OKP" and keys[0]["alg"] == "EdDSA" and "d" not in keys[0]


def test_internal_route_needs_the_key(client: TestClient) -> None:
    body = {"job_id": 1, "status": "running"}
    assert client.put("/_job_status", json=body).status_code == 401
    assert client.put("/_job_status", json=body, headers={"x-api-key": "wrong"}).status_code == 401


def test_health_needs_no_token_and_reaches_the_database(client: TestClient) -> None:
    response = client.get("/health")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})
    app: Any = client.app
    app.state.engine.dispose()
    broken = create_db_engine("postgresql+psycopg://nobody@127.0.0.1:9/none")
    app.state.session_factory.configure(bind=broken)
    try:
        down = client.get("/health")
    finally:
        app.state.session_factory.configure(bind=app.state.engine)
        broken.dispose()
    assert down.status_code == 503
    assert "database does not answer" in down.json()["detail"]
