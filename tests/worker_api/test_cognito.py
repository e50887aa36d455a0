"""The worker API with AUTH=cognito against a user pool on moto's server: workers'
ID tokens verified against the pool's JWKS, ``workers`` needed, ``cloud`` making a
cloud worker, and tokens of other pools refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

from labcloud.contract import Environment, Group
from tests.aws import MotoServer
from tests.cognito import CognitoPool, create_pool
from tests.worker_api.conftest import ClientFactory, FakeUserApi, app_clients, enqueue, pull

PASSWORD = "worker-pass-1"


@pytest.fixture
def pool(aws: MotoServer) -> CognitoPool:
    pool = create_pool(aws)
    pool.add_user("cloud-1@example.org", PASSWORD, Group.WORKERS, Group.CLOUD)
    pool.add_user("local-1@example.org", PASSWORD, Group.WORKERS)
    pool.add_user("ada@example.org", PASSWORD, Group.USERS)
    return pool


@pytest.fixture
def make_client(
    tmp_path: Path, fake_user_api: FakeUserApi, pool: CognitoPool
) -> Iterator[ClientFactory]:
    yield from app_clients(tmp_path, fake_user_api, **pool.settings())


def bearer(pool: CognitoPool, email: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {pool.login(email, PASSWORD)}"}


def test_workers_pull_the_jobs_of_their_environment(
    make_client: ClientFactory, pool: CognitoPool
) -> None:
    client = make_client()
    enqueue(client, 1, environment=Environment.CLOUD)
    enqueue(client, 2, environment=Environment.LOCAL)
    local = pull(client, bearer(pool, "local-1@example.org"), limit=5)
    assert [spec["meta"]["job_id"] for spec in local.values()] == [2]
    cloud = pull(client, bearer(pool, "cloud-1@example.org"), limit=5)
    assert [spec["meta"]["job_id"] for spec in cloud.values()] == [1]
    # The worker's name is its account's: the job's status names it as assignee.
    queue_id = next(iter(cloud))
    status = client.get(f"/jobs/{queue_id}/status", headers=bearer(pool, "cloud-1@example.org"))
    assert status.status_code == 200


def test_only_workers_of_this_pool_are_let_in(
    make_client: ClientFactory, pool: CognitoPool, aws: MotoServer, fake_user_api: FakeUserApi
) -> None:
    client = make_client()
    assert client.get("/access_info").json() == {
        "cognito": {
            "user_pool_id": pool.pool_id,
            "client_id": pool.client_id,
            "region": pool.region,
        },
        "auth": "cognito",
    }
    user = client.get("/jobs", params={"memory": 1}, headers=bearer(pool, "ada@example.org"))
    assert user.status_code == 403

    other = create_pool(aws, name="elsewhere")
    other.add_user("local-1@example.org", PASSWORD, Group.WORKERS)
    stranger = {"Authorization": f"Bearer {other.login('local-1@example.org', PASSWORD)}"}
    assert client.get("/jobs", params={"memory": 1}, headers=stranger).status_code == 401

    # A worker disabled by an admin (the user API says so) is refused at once.
    headers = bearer(pool, "local-1@example.org")
    subject = jwt.decode(headers["Authorization"][7:], options={"verify_signature": False})["sub"]
    fake_user_api.accounts[subject] = {"active": False}
    assert client.get("/jobs", params={"memory": 1}, headers=headers).status_code == 401
