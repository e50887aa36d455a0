"""Settings of the worker runner, read from the environment and an env file.

The names are those of DECODE OpenCloud's worker (``API_URL``, ``USERNAME``,
``PASSWORD``, ``PATH_BASE``, ``PATH_HOST_BASE``, ``TIMEOUT_JOB``,
``TIMEOUT_STATUS``) so an existing worker configuration keeps working; the others
are extensions. The runner refuses to start on a missing or malformed setting and
names it (``describe_validation_error``).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Self

import httpx
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from labcloud.settings import describe_settings_error


def _base_url(value: str) -> str:
    try:
        url = httpx.URL(value)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError(f"not a URL: {exc}") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an http:// or https:// URL with a host")
    return str(url).rstrip("/")


class WorkerSettings(BaseSettings):
    """Everything the runner needs to know about its host and the worker API."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    api_url: str = Field(description="Base URL of the worker API.")
    auth_url: str = Field(description="Base URL of the user API, where POST /token lives.")
    username: str = Field(min_length=1, description="Worker account; also the worker's name.")
    password: SecretStr

    path_base: Path = Field(
        default=Path("./.labcloud/jobs"), description="Folder holding one folder per job."
    )
    path_host_base: Path | None = Field(
        default=None,
        description=(
            "PATH_BASE as the Docker host sees it (when the runner itself runs in a "
            "container); defaults to PATH_BASE."
        ),
    )
    timeout_job: float = Field(default=10.0, gt=0, description="Seconds between empty polls.")
    timeout_status: float = Field(default=5.0, gt=0, description="Seconds between keep-alives.")
    # Short enough that a stopping runner, which lets its pull end, stops within
    # seconds; a new job still starts at once (the pull returns when one arrives).
    wait: float = Field(default=5.0, ge=0, le=300, description="Long-poll seconds per pull.")
    slots: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Most jobs run at the same time (as many as fit in the free resources).",
    )
    cpu_cores: int | None = Field(default=None, ge=1, description="Overrides the detected cores.")
    memory: int | None = Field(default=None, ge=6, description="Overrides detected memory (MiB).")
    container_network: str = Field(
        default="none", min_length=1, description="Docker network mode of job containers."
    )
    # A tool with a few hundred threads fits; a fork bomb stops long before the
    # host's own process table fills up.
    container_pids_limit: int = Field(
        default=1024,
        ge=8,
        le=4_194_304,
        description=(
            "Most processes and threads a job container may have at once (a catalog "
            "entrypoint's container.pids_limit overrides it)."
        ),
    )
    shutdown_grace: float = Field(
        default=30.0, ge=0, description="Seconds running jobs get to finish on SIGTERM."
    )
    keep_job_folders: bool = Field(default=False, description="Keep job folders (debugging).")
    log_level: str = "INFO"

    @field_validator("api_url", "auth_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return _base_url(value)

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
        return value

    @model_validator(mode="after")
    def _resolve_paths(self) -> Self:
        # Docker bind mounts need absolute paths, and the folder must not move if the
        # process changes its working directory later.
        self.path_base = self.path_base.expanduser().resolve()
        if self.path_host_base is None:
            self.path_host_base = self.path_base
        elif not self.path_host_base.is_absolute():
            raise ValueError("PATH_HOST_BASE must be an absolute path on the Docker host")
        return self

    @property
    def host_base(self) -> Path:
        """PATH_HOST_BASE, resolved (never None after validation)."""
        return self.path_host_base if self.path_host_base is not None else self.path_base

    @property
    def worker_name(self) -> str:
        """The worker's name: its account name, as the worker API knows it."""
        return self.username

    @property
    def runner_id(self) -> str:
        """This runner's identity on the Docker host: a short hash of its account
        and its job folder (as this process and as the Docker host see it).

        Its containers and job folders are marked with it, and a starting runner
        removes only what carries its own: every stack on a host, and every
        runner of one stack, has a folder or an account of its own, while the
        account name alone is the same in every stack (``labcloud up``)."""
        key = "\0".join((self.username, str(self.path_base), str(self.host_base)))
        return hashlib.sha256(key.encode()).hexdigest()[:16]


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
