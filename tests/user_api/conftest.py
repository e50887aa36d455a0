"""A user API app on a temporary SQLite database and data folder."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from labcloud.auth.local import generate_private_key_pem
from tests.user_api.helpers import PASSWORD
from user_api.app import create_app
from user_api.settings import UserApiSettings

TEST_CATALOG = Path(__file__).resolve().parents[1] / "data" / "application_config.yaml"


@pytest.fixture
def user_settings(tmp_path: Path, database_url: str) -> UserApiSettings:
    return UserApiSettings(
        _env_file=None,
        internal_api_key_secret=secrets.token_urlsafe(24),
        local_auth_private_key=generate_private_key_pem(),
        database_url=database_url,
        user_data_root_path=tmp_path / "data",
        application_config_file=TEST_CATALOG,
        # Nothing listens there: jobs stay in the outbox, which these tests inspect.
        workerfacing_api_url="http://127.0.0.1:9",
        allow_self_signup=True,
        bootstrap_admin_email="admin@example.org",
        bootstrap_admin_password=PASSWORD,
    )


@pytest.fixture
def client(user_settings: UserApiSettings) -> Iterator[TestClient]:
    with TestClient(create_app(user_settings)) as test_client:
        yield test_client
