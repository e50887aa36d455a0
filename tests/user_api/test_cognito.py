"""The user API with AUTH=cognito against a user pool on moto's server: sign-up,
confirmation and login through the development auth routes, groups from the
tokens, the admin API acting on the pool, and tokens the API must refuse."""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient

from labcloud.contract import Group
from tests.aws import MotoServer
from tests.cognito import CognitoPool, create_pool
from tests.user_api.conftest import TEST_CATALOG
from tests.user_api.helpers import PASSWORD
from user_api.app import create_app
from user_api.settings import UserApiSettings

ADMIN = "admin@example.org"
ClientFactory = Callable[..., TestClient]


@pytest.fixture
def pool(aws: MotoServer) -> CognitoPool:
    pool = create_pool(aws)
    pool.add_user(ADMIN, PASSWORD, Group.USERS, Group.ADMINS)
    return pool


@pytest.fixture
def make_client(pool: CognitoPool, tmp_path: Path, database_url: str) -> Iterator[ClientFactory]:
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        values: dict[str, Any] = {
            "internal_api_key_secret": secrets.token_urlsafe(24),
            "database_url": database_url,
            "user_data_root_path": tmp_path / "data",
            "application_config_file": TEST_CATALOG,
            "workerfacing_api_url": "http://127.0.0.1:9",
            "allow_self_signup": True,
            "cognito_auth_routes": True,
            **pool.settings(),
            **overrides,
        }
        client = TestClient(create_app(UserApiSettings(_env_file=None, **values)))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: ClientFactory) -> TestClient:
    return make_client()


def token(client: TestClient, email: str, password: str = PASSWORD) -> str:
    response = client.post("/token", data={"username": email, "password": password})
    assert response.status_code == 201, response.text
    return str(response.json()["id_token"])


def bearer(id_token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {id_token}"}


# -- sign-up and login ---------------------------------------------------------------


def test_sign_up_confirm_login_and_user(client: TestClient, pool: CognitoPool) -> None:
    created = client.post("/user", data={"username": "Ada@Example.org", "password": PASSWORD})
    assert created.status_code == 201, created.text
    assert created.json() == {"email": "Ada@example.org", "groups": ["users"]}
    assert pool.user("Ada@example.org")["UserStatus"] == "CONFIRMED"
    assert pool.groups_of("Ada@example.org") == ["users"]

    answer = client.post("/token", data={"username": "Ada@example.org", "password": PASSWORD})
    assert answer.status_code == 201
    body = answer.json()
    assert set(body) == {"id_token", "expires_in"} and body["expires_in"] > 0
    assert jwt.get_unverified_header(body["id_token"])["alg"] == "RS256"
    claims = jwt.decode(body["id_token"], options={"verify_signature": False})
    assert claims["iss"] == pool.issuer and claims["cognito:groups"] == ["users"]

    me = client.get("/user", headers=bearer(body["id_token"]))
    assert me.status_code == 200
    assert me.json() == {"email": "Ada@example.org", "groups": ["users"]}

    logged_in = client.post("/login", data={"username": "Ada@example.org", "password": PASSWORD})
    assert logged_in.status_code == 200
    assert logged_in.json() == {"email": "Ada@example.org", "groups": ["users"]}
    assert "httponly" in logged_in.headers["set-cookie"].lower()
    # The cookie the login set stands in for the header.
    assert client.get("/user").json()["email"] == "Ada@example.org"

    info = client.get("/access_info").json()
    assert info["cognito"] == {
        "user_pool_id": pool.pool_id,
        "client_id": pool.client_id,
        "region": pool.region,
    }
    assert info["auth"] == "cognito" and info["token_url"] == "/token"


def test_sign_up_and_login_errors(client: TestClient) -> None:
    assert (
        client.post("/user", data={"username": "bo@example.org", "password": PASSWORD}).status_code
        == 201
    )
    again = client.post("/user", data={"username": "bo@example.org", "password": PASSWORD})
    assert again.status_code == 409
    weak = client.post("/user", data={"username": "cy@example.org", "password": "short1"})
    assert weak.status_code == 400 and weak.json()["detail"]
    not_an_email = client.post("/user", data={"username": "nobody", "password": PASSWORD})
    assert not_an_email.status_code == 400
    anonymous_admin = client.post(
        "/user", data={"username": "eve@example.org", "password": PASSWORD, "groups": ["admins"]}
    )
    assert anonymous_admin.status_code == 403

    wrong = client.post("/token", data={"username": "bo@example.org", "password": "wrong-pass-1"})
    assert wrong.status_code == 401
    assert wrong.json()["detail"] == "Incorrect email or password."
    unknown = client.post("/token", data={"username": "zed@example.org", "password": PASSWORD})
    assert unknown.status_code == 401 and unknown.json() == wrong.json()
    assert (
        client.post(
            "/login", data={"username": "bo@example.org", "password": "wrong-pass-1"}
        ).status_code
        == 401
    )


def test_an_admin_creates_accounts_in_any_group(client: TestClient, pool: CognitoPool) -> None:
    admin = bearer(token(client, ADMIN))
    created = client.post(
        "/user",
        data={"username": "w1@example.org", "password": PASSWORD, "groups": ["workers", "cloud"]},
        headers=admin,
    )
    assert created.status_code == 201, created.text
    assert pool.groups_of("w1@example.org") == ["cloud", "workers"]


def test_the_routes_are_off_unless_configured(
    make_client: ClientFactory, pool: CognitoPool
) -> None:
    client = make_client(cognito_auth_routes=False)
    for route in ("/user", "/token", "/login"):
        answer = client.post(route, data={"username": ADMIN, "password": PASSWORD})
        assert answer.status_code == 404, route
        assert "COGNITO_AUTH_ROUTES" in answer.json()["detail"]
    assert client.get("/access_info").json()["token_url"] is None
    # Tokens from the pool still work.
    me = client.get("/user", headers=bearer(pool.login(ADMIN, PASSWORD)))
    assert me.json() == {"email": ADMIN, "groups": ["admins", "users"]}


def test_groups_come_from_the_token(client: TestClient, pool: CognitoPool) -> None:
    pool.add_user("w2@example.org", PASSWORD, Group.WORKERS)
    worker = bearer(token(client, "w2@example.org"))
    assert client.get("/user", headers=worker).status_code == 403  # not in 'users'
    pool.idp.admin_add_user_to_group(
        UserPoolId=pool.pool_id, Username="w2@example.org", GroupName="users"
    )
    assert client.get("/user", headers=worker).status_code == 403  # the old token says no
    fresh = bearer(token(client, "w2@example.org"))
    assert client.get("/user", headers=fresh).json()["groups"] == ["users", "workers"]


def test_a_pool_that_names_accounts_by_email(
    aws: MotoServer, tmp_path: Path, database_url: str
) -> None:
    pool = create_pool(aws, name="by-email", email_usernames=True)
    pool.add_user(ADMIN, PASSWORD, Group.USERS, Group.ADMINS)
    settings = UserApiSettings(
        _env_file=None,
        internal_api_key_secret=secrets.token_urlsafe(24),
        database_url=database_url,
        user_data_root_path=tmp_path / "data",
        application_config_file=TEST_CATALOG,
        workerfacing_api_url="http://127.0.0.1:9",
        allow_self_signup=True,
        signup_requires_approval=True,
        cognito_auth_routes=True,
        cognito_issuer=pool.issuer,
        **pool.settings(),
    )
    with TestClient(create_app(settings)) as client:
        email = "grace@example.org"
        assert (
            client.post("/user", data={"username": email, "password": PASSWORD}).status_code == 201
        )
        claims = jwt.decode(token(client, email), options={"verify_signature": False})
        assert claims["cognito:username"] != email  # the pool's name for it is a UUID
        admin = bearer(token(client, ADMIN))
        assert client.post(f"/admin/users/{email}/approve", headers=admin).status_code == 200
        assert client.get("/user", headers=bearer(token(client, email))).json() == {
            "email": email,
            "groups": ["users"],
        }
        client.put(
            f"/admin/users/{email}/groups", json={"groups": ["users", "cloud"]}, headers=admin
        )
        assert pool.groups_of(email) == ["cloud", "users"]
        client.post(f"/admin/users/{email}/disable", headers=admin)
        assert (
            client.post("/token", data={"username": email, "password": PASSWORD}).status_code == 401
        )


# -- the admin API on the pool -------------------------------------------------------


def test_approve_groups_and_disable_act_on_the_pool(
    make_client: ClientFactory, pool: CognitoPool
) -> None:
    client = make_client(signup_requires_approval=True)
    admin = bearer(token(client, ADMIN))
    email = "new@example.org"
    created = client.post("/user", data={"username": email, "password": PASSWORD})
    assert created.json() == {"email": email, "groups": []}
    assert pool.groups_of(email) == []
    pending = client.get("/user", headers=bearer(token(client, email)))
    assert pending.status_code == 403 and "approval" in pending.json()["detail"]
    listed = client.get("/admin/users", params={"status": "pending"}, headers=admin).json()
    assert [user["email"] for user in listed] == [email]

    approved = client.post(f"/admin/users/{email}/approve", headers=admin)
    assert approved.status_code == 200, approved.text
    assert approved.json()["status"] == "active"
    assert pool.groups_of(email) == ["users"]
    user = bearer(token(client, email))
    assert client.get("/user", headers=user).json() == {"email": email, "groups": ["users"]}

    groups = client.put(
        f"/admin/users/{email}/groups", json={"groups": ["users", "workers"]}, headers=admin
    )
    assert groups.status_code == 200, groups.text
    assert pool.groups_of(email) == ["users", "workers"]
    assert client.get("/user", headers=bearer(token(client, email))).json()["groups"] == [
        "users",
        "workers",
    ]
    client.put(f"/admin/users/{email}/groups", json={"groups": ["workers"]}, headers=admin)
    assert pool.groups_of(email) == ["workers"]
    assert client.get("/user", headers=bearer(token(client, email))).status_code == 403

    client.put(f"/admin/users/{email}/groups", json={"groups": ["users"]}, headers=admin)
    user = bearer(token(client, email))
    disabled = client.post(f"/admin/users/{email}/disable", headers=admin)
    assert disabled.status_code == 200 and disabled.json()["status"] == "disabled"
    assert pool.user(email)["Enabled"] is False
    refused = client.post("/token", data={"username": email, "password": PASSWORD})
    assert refused.status_code == 401 and "disabled" in refused.json()["detail"]
    assert client.get("/user", headers=user).status_code == 401  # its last token too

    assert client.post(f"/admin/users/{email}/enable", headers=admin).status_code == 200
    assert pool.user(email)["Enabled"] is True
    assert client.get("/user", headers=bearer(token(client, email))).status_code == 200

    actions = [entry["action"] for entry in client.get("/admin/audit", headers=admin).json()]
    assert actions.count("approve_user") == 1 and "disable_user" in actions


def test_a_worker_the_user_api_never_saw_can_be_disabled(
    make_client: ClientFactory, pool: CognitoPool
) -> None:
    key = secrets.token_urlsafe(24)
    client = make_client(internal_api_key_secret=key)
    pool.add_user("w9@example.org", PASSWORD, Group.WORKERS, Group.CLOUD)
    subject = jwt.decode(
        pool.login("w9@example.org", PASSWORD), options={"verify_signature": False}
    )["sub"]
    admin = bearer(token(client, ADMIN))
    assert client.post("/admin/users/nobody@example.org/disable", headers=admin).status_code == 404
    disabled = client.post("/admin/users/w9@example.org/disable", headers=admin)
    assert disabled.status_code == 200, disabled.text
    assert disabled.json()["groups"] == ["cloud", "workers"]
    assert pool.user("w9@example.org")["Enabled"] is False
    # What the worker API asks before it lets the worker's still valid token in.
    state = client.get(f"/_accounts/{subject}", headers={"x-api-key": key})
    assert state.status_code == 200 and state.json()["active"] is False


def test_an_admin_creates_a_worker_in_the_pool(
    make_client: ClientFactory, pool: CognitoPool
) -> None:
    key = secrets.token_urlsafe(24)
    client = make_client(internal_api_key_secret=key, cognito_auth_routes=False)
    admin = bearer(pool.login(ADMIN, PASSWORD))
    created = client.post("/admin/workers", json={"name": "gpu-2", "cloud": True}, headers=admin)
    assert created.status_code == 201, created.text
    body = created.json()
    email, password = body["settings"]["USERNAME"], body["settings"]["PASSWORD"]
    assert body["groups"] == ["cloud", "workers"]
    assert pool.user(email)["UserStatus"] == "CONFIRMED"
    assert pool.groups_of(email) == ["cloud", "workers"]
    # The runner logs in with what the answer holds, as a cloud worker.
    claims = jwt.decode(pool.login(email, password), options={"verify_signature": False})
    assert sorted(claims["cognito:groups"]) == ["cloud", "workers"]
    state = client.get(f"/_accounts/{claims['sub']}", headers={"x-api-key": key})
    assert state.status_code == 200 and state.json()["active"] is True
    again = client.post("/admin/workers", json={"name": "gpu-2"}, headers=admin)
    assert again.status_code == 409, again.text


def test_the_last_admin_keeps_its_group_in_the_pool(client: TestClient, pool: CognitoPool) -> None:
    admin = bearer(token(client, ADMIN))
    client.get("/user", headers=admin)
    refused = client.put(f"/admin/users/{ADMIN}/groups", json={"groups": ["users"]}, headers=admin)
    assert refused.status_code == 409
    assert pool.groups_of(ADMIN) == ["admins", "users"]


# -- tokens the API refuses -----------------------------------------------------------


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _claims(pool: CognitoPool, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": pool.issuer,
        "aud": pool.client_id,
        "sub": "forged",
        "email": ADMIN,
        "token_use": "id",
        "cognito:groups": ["users", "admins"],
        "iat": now,
        "exp": now + 600,
    }
    claims.update(changes)
    return claims


def test_tokens_of_another_pool_or_algorithm_are_refused(
    client: TestClient, pool: CognitoPool, aws: MotoServer
) -> None:
    genuine = pool.login(ADMIN, PASSWORD)
    assert client.get("/user", headers=bearer(genuine)).status_code == 200

    other = create_pool(aws, name="elsewhere")
    other.add_user(ADMIN, PASSWORD, Group.USERS, Group.ADMINS)
    # Same JWKS on moto, same email: only the issuer and audience tell them apart.
    assert client.get("/user", headers=bearer(other.login(ADMIN, PASSWORD))).status_code == 401

    unsigned = f"{_b64({'alg': 'none', 'typ': 'JWT', 'kid': 'dummy'})}.{_b64(_claims(pool))}."
    assert client.get("/user", headers=bearer(unsigned)).status_code == 401

    # HS256 keyed with the pool's public key (the classic algorithm confusion).
    public = jwt.PyJWKSet.from_json(_fetch(pool.jwks_url)).keys[0].key
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    confused = _hs256(_claims(pool), pem, kid="dummy")
    assert client.get("/user", headers=bearer(confused)).status_code == 401

    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(_claims(pool), stranger, algorithm="RS256", headers={"kid": "dummy"})
    assert client.get("/user", headers=bearer(forged)).status_code == 401
    access = pool.idp.initiate_auth(
        ClientId=pool.client_id,
        AuthFlow="USER_PASSWORD_AUTH",
        AuthParameters={"USERNAME": ADMIN, "PASSWORD": PASSWORD},
    )["AuthenticationResult"]["AccessToken"]
    assert client.get("/user", headers=bearer(access)).status_code == 401  # not an ID token


def _fetch(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def _hs256(claims: dict[str, Any], key: bytes, *, kid: str) -> str:
    import hashlib
    import hmac

    signing_input = f"{_b64({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{_b64(claims)}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"
