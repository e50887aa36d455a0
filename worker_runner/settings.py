"""Settings of the worker runner, read from the environment and an env file.

The names are those of DECODE OpenCloud's worker (``API_URL``, ``USERNAME``,
``PASSWORD``, ``TIMEOUT_JOB``, ``TIMEOUT_STATUS``; ``PATH_BASE``, every
backend's, and ``PATH_HOST_BASE``, the Docker backend's) so an existing worker
configuration keeps working; the others are extensions. ``BACKEND`` chooses the
execution backend, whose own settings (``worker_runner.backends.registry``) are
read from the same environment and file. The runner refuses to start on a missing
or malformed setting and names it (``describe_validation_error``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from labcloud.secrets import resolve_secret_setting
from labcloud.settings import describe_settings_error
from worker_runner.backends.registry import BackendKind


def _base_url(value: str) -> str:
    try:
        url = httpx.URL(value)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError(f"not a URL: {exc}") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an http:// or https:// URL with a host")
    return str(url).rstrip("/")


class WorkerSettings(BaseSettings):
    """What the runner needs to know about the worker API and its own loop (what
    runs the jobs is configured by the backend's settings)."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    api_url: str = Field(description="Base URL of the worker API.")
    auth_url: str | None = Field(
        default=None,
        description=(
            "Base URL of the user API, where POST /token lives; not needed when the worker "
            "API's /access_info names a Cognito pool (the runner logs in there)."
        ),
    )
    username: str = Field(min_length=1, description="Worker account; also the worker's name.")
    password: SecretStr
    cognito_secret: SecretStr | None = Field(
        default=None,
        description="Secret of the Cognito app client, when it has one (a value or an ARN).",
    )

    backend: BackendKind = Field(
        default=BackendKind.DOCKER, description="Where jobs run (the execution backend)."
    )
    timeout_job: float = Field(default=10.0, gt=0, description="Seconds between empty polls.")
    timeout_status: float = Field(default=5.0, gt=0, description="Seconds between keep-alives.")
    # Short enough that a stopping runner, which lets its pull end, stops within
    # seconds; a new job still starts at once (the pull returns when one arrives).
    wait: float = Field(default=5.0, ge=0, le=300, description="Long-poll seconds per pull.")
    shutdown_grace: float = Field(
        default=30.0, ge=0, description="Seconds running jobs get to finish on SIGTERM."
    )
    keep_job_folders: bool = Field(default=False, description="Keep job folders (debugging).")
    log_level: str = "INFO"

    @field_validator("api_url", "auth_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        return _base_url(value) if value is not None else None

    @field_validator("cognito_secret")
    @classmethod
    def _resolve_cognito_secret(cls, value: SecretStr | None) -> SecretStr | None:
        return resolve_secret_setting(value, "COGNITO_SECRET")

    @field_validator("backend", mode="before")
    @classmethod
    def _backend_name(cls, value: object) -> object:
        # Environment variables are case-insensitive in spirit: BACKEND=Docker works.
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        level = value.upper()
        if not isinstance(logging.getLevelNamesMapping().get(level), int):
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @field_validator("password")
    @classmethod
    def _check_password(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value():
            raise ValueError("must not be empty")
        # A value or a Secrets Manager ARN, resolved once at start.
        resolved = resolve_secret_setting(value, "PASSWORD")
        assert resolved is not None
        return resolved

    @property
    def worker_name(self) -> str:
        """The worker's name: its account name, as the worker API knows it."""
        return self.username


def load_settings(env_file: Path | None = None) -> WorkerSettings:
    """Read the settings from the environment and ``env_file`` (default ``.env``).

    Raises ``FileNotFoundError`` when an explicitly named env file does not exist
    (pydantic-settings would silently ignore it) and ``pydantic.ValidationError``
    when a setting is missing or malformed."""
    if env_file is None:
        return WorkerSettings()
    if not env_file.is_file():
        raise FileNotFoundError(f"env file not found: {env_file}")
    return WorkerSettings(_env_file=env_file)


def describe_validation_error(exc: ValidationError) -> str:
    """One line per bad setting, named as its environment variable."""
    return f"invalid worker settings:\n{describe_settings_error(exc)}"
