"""Secrets given as Secrets Manager ARNs, resolved at start against moto's server.

Each setting documented as "value or ARN" is loaded the way its service loads it; an
unreadable ARN stops the start with a message naming the setting and never its value.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from labcloud.secrets import SecretResolutionError, resolve_secret
from labcloud.settings import load_settings
from tests.aws import MotoServer
from user_api.app import create_app
from user_api.settings import UserApiSettings
from worker_api.settings import WorkerApiSettings
from worker_runner.settings import WorkerSettings
from worker_runner.settings import load_settings as load_runner_settings

INTERNAL_KEY = "an-internal-key-of-enough-length"
VALUE = "the-value-kept-in-secrets-manager"


@pytest.fixture
def no_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from the environment only (no ``.env`` in the working folder)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INTERNAL_API_KEY_SECRET", INTERNAL_KEY)
    monkeypatch.setenv("LOCAL_AUTH_PRIVATE_KEY", "a PEM key")


def _create_secret(aws: MotoServer, name: str, value: str) -> str:
    response = aws.client("secretsmanager").create_secret(Name=name, SecretString=value)
    return str(response["ARN"])


def _user_api() -> UserApiSettings:
    return load_settings(UserApiSettings)


def _worker_api() -> WorkerApiSettings:
    return load_settings(WorkerApiSettings)


def _runner() -> WorkerSettings:
    return load_runner_settings()


# (environment variable, settings loader, attribute) for every "value or ARN" setting.
SECRET_SETTINGS: list[tuple[str, Any, str]] = [
    ("INTERNAL_API_KEY_SECRET", _user_api, "internal_api_key_secret"),
    ("INTERNAL_API_KEY_SECRET", _worker_api, "internal_api_key_secret"),
    ("COGNITO_SECRET", _user_api, "cognito_secret"),
    ("COGNITO_SECRET", _worker_api, "cognito_secret"),
    ("DATABASE_SECRET", _user_api, "database_secret"),
    ("LOCAL_AUTH_PRIVATE_KEY", _user_api, "local_auth_private_key"),
    ("EMAIL_SENDER_SECRET_KEY", _user_api, "email_sender_secret_key"),
    ("QUEUE_DB_SECRET", _worker_api, "queue_db_secret"),
    ("PASSWORD", _runner, "password"),
]


@pytest.fixture
def runner_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_URL", "http://127.0.0.1:8001")
    monkeypatch.setenv("AUTH_URL", "http://127.0.0.1:8000")
    monkeypatch.setenv("USERNAME", "worker-1")
    monkeypatch.setenv("PASSWORD", "a-plain-password")
    monkeypatch.setenv("USERFACING_API_URL", "http://127.0.0.1:8000")


@pytest.mark.parametrize(
    ("variable", "load", "attribute"),
    SECRET_SETTINGS,
    ids=[f"{variable}-{load.__name__.strip('_')}" for variable, load, _ in SECRET_SETTINGS],
)
@pytest.mark.usefixtures("no_env_file", "runner_env")
def test_an_arn_is_resolved_at_start(
    aws: MotoServer, monkeypatch: pytest.MonkeyPatch, variable: str, load: Any, attribute: str
) -> None:
    value = VALUE + "-" + variable.lower()
    arn = _create_secret(aws, f"labcloud/{variable.lower()}", value)
    monkeypatch.setenv(variable, arn)
    settings = load()
    secret = getattr(settings, attribute)
    assert isinstance(secret, SecretStr)
    assert secret.get_secret_value() == value


@pytest.mark.usefixtures("no_env_file")
def test_an_rds_json_secret_fills_the_database_urls(
    aws: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The shape RDS writes; a password with characters a URL must quote.
    password = "p@ss/word:with%signs"
    arn = _create_secret(
        aws,
        "rds!db-0123",
        json.dumps({"username": "labcloud", "password": password, "engine": "postgres"}),
    )
    monkeypatch.setenv("DATABASE_URL", "postgresql://labcloud:{}@db.internal:5432/users")
    monkeypatch.setenv("DATABASE_SECRET", arn)
    monkeypatch.setenv("QUEUE_DB_URL", "postgresql://labcloud:{}@db.internal:5432/queue")
    monkeypatch.setenv("QUEUE_DB_SECRET", arn)
    monkeypatch.setenv("USERFACING_API_URL", "http://127.0.0.1:8000")
    quoted = "p%40ss%2Fword%3Awith%25signs"
    assert _user_api().resolved_database_url == (
        f"postgresql+psycopg://labcloud:{quoted}@db.internal:5432/users"
    )
    assert _worker_api().resolved_database_url == (
        f"postgresql+psycopg://labcloud:{quoted}@db.internal:5432/queue"
    )


@pytest.mark.usefixtures("no_env_file")
def test_an_unreadable_arn_stops_the_user_api_naming_the_setting_only(
    aws: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = "arn:aws:secretsmanager:us-east-1:123456789012:secret:labcloud/absent-AbCdEf"
    monkeypatch.setenv("DATABASE_URL", "postgresql://labcloud:{}@db.internal/users")
    monkeypatch.setenv("DATABASE_SECRET", missing)
    with pytest.raises(SystemExit) as exited:
        create_app()
    message = str(exited.value.code)
    assert message.startswith("UserApiSettings: invalid settings\n")
    assert "DATABASE_SECRET" in message
    assert "ResourceNotFoundException" in message
    assert "absent" not in message
    assert "arn:aws" not in message


@pytest.mark.usefixtures("no_env_file")
def test_secrets_manager_unreachable_stops_the_worker_api_naming_the_setting(
    aws: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port}")
    arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:labcloud/internal-AbCdEf"
    monkeypatch.setenv("INTERNAL_API_KEY_SECRET", arn)
    monkeypatch.setenv("USERFACING_API_URL", "http://127.0.0.1:8000")
    with pytest.raises(SystemExit) as exited:
        _worker_api()
    message = str(exited.value.code)
    assert "INTERNAL_API_KEY_SECRET" in message
    assert "EndpointConnectionError" in message
    assert arn not in message


def test_a_binary_secret_is_refused(aws: MotoServer) -> None:
    arn = str(
        aws.client("secretsmanager").create_secret(
            Name="labcloud/binary", SecretBinary=b"\x00\x01"
        )["ARN"]
    )
    with pytest.raises(SecretResolutionError, match=r"COGNITO_SECRET .* without a string value"):
        resolve_secret(arn, "COGNITO_SECRET")


def test_a_plain_value_is_kept_and_needs_no_aws() -> None:
    assert resolve_secret("a-plain-value", "COGNITO_SECRET") == "a-plain-value"
    assert resolve_secret('{"password": "from-json"}', "DATABASE_SECRET") == "from-json"
