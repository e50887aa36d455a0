"""A user API app (``client``, without an email sender) and sessions of its
database that queue completion emails, so that what a transition writes can be
read back before anything sends it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from labcloud.db import create_db_engine, make_session_factory
from tests.user_api.helpers import signup
from user_api.notifications.service import CompletionEmails, enable_completion_emails
from user_api.settings import UserApiSettings

OWNER = "ada@example.org"


@pytest.fixture
def engine(user_settings: UserApiSettings) -> Iterator[Engine]:
    engine = create_db_engine(user_settings.resolved_database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    factory = make_session_factory(engine)
    enable_completion_emails(factory, CompletionEmails(frontend_url="https://lab.example.org"))
    return factory


@pytest.fixture
def owner(client: TestClient) -> dict[str, str]:
    """The Authorization header of a user who owns the jobs of a test."""
    return signup(client, OWNER)


def create_job(client: TestClient, headers: dict[str, str], name: str = "job-1") -> int:
    """A job of the demo catalog without inputs, through ``POST /jobs``."""
    body = {
        "job_name": name,
        "application": {"application": "demo", "version": "latest", "entrypoint": "wordcount"},
    }
    response = client.post("/jobs", json=body, headers=headers)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    assert isinstance(job_id, int)
    return job_id
