"""User API settings (contract section 5), read from the environment and ``.env``."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Self

from pydantic import EmailStr, Field, SecretStr, ValidationInfo, field_validator, model_validator

from labcloud.db import build_database_url
from labcloud.secrets import resolve_secret_setting
from labcloud.settings import AuthMode, ServiceSettings
from user_api.catalog.sources import parse_s3_location


class EmailSenderService(StrEnum):
    NONE = ""
    MAILJET = "mailjet"


class UserApiSettings(ServiceSettings):
    database_url: str = "sqlite:///./.labcloud/user_api.db"
    database_secret: SecretStr | None = None
    # Connections are opened as requests need them and up to DB_POOL_SIZE are kept
    # open; beyond that, up to DB_MAX_OVERFLOW more are opened and closed per use,
    # which costs a new server process on PostgreSQL each time. 20 covers the
    # requests one process serves at once under load without that churn.
    db_pool_size: int = Field(default=20, ge=1)
    db_max_overflow: int = Field(default=10, ge=0)

    workerfacing_api_url: str = "http://127.0.0.1:8001"
    public_url: str = Field(
        default="http://127.0.0.1:8000",
        description="External base URL of this API, used in signed download/upload links.",
    )
    signed_url_expiry_seconds: int = Field(default=600, ge=10, le=7 * 24 * 3600)

    # A local path or s3://BUCKET/KEY (user_api.catalog.sources).
    application_config_file: str | Path = "application_config.yaml"
    application_config_poll_seconds: float = Field(
        default=30.0, gt=0, description="How often an S3 catalog's ETag is checked."
    )

    @field_validator("application_config_file")
    @classmethod
    def _check_catalog_location(cls, value: str | Path) -> str | Path:
        if isinstance(value, str):
            parse_s3_location(value)
        return value

    # Local auth.
    local_auth_private_key: SecretStr | None = Field(
        default=None,
        description="Ed25519 private key (PEM, or a Secrets Manager ARN) signing local tokens.",
    )
    token_lifetime_seconds: int = Field(default=12 * 3600, ge=60)
    allow_self_signup: bool = False
    bootstrap_admin_email: EmailStr | None = None
    bootstrap_admin_password: SecretStr | None = None

    # Cognito (AUTH=cognito).
    cognito_auth_routes: bool = Field(
        default=False,
        description=(
            "POST /user, /token and /login sign up and log in through the Cognito user "
            "pool (development and test stacks; DECODE's clients use them)."
        ),
    )
    cognito_confirm_signups: bool = Field(
        default=True,
        description=(
            "Accounts created through POST /user are confirmed by the user API "
            "(admin_confirm_sign_up) instead of by the code Cognito sends."
        ),
    )

    signup_requires_approval: bool = Field(
        default=False, description="Self-signed-up accounts wait for an admin's approval."
    )

    # Fair use: defaults of the per-user limits (admins may set others per user).
    # Per-user limits for accounts without their own; "unlimited" (or empty) for none.
    default_max_active_jobs: int | None = Field(default=100, ge=0)
    default_max_storage_bytes: int | None = Field(default=100 * 1024**3, ge=0)

    @field_validator("default_max_active_jobs", "default_max_storage_bytes", mode="before")
    @classmethod
    def _unlimited(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in ("", "unlimited", "none"):
            return None
        return value

    # Bytes stored per account are counted in the database (user_api.files.usage).
    storage_usage_max_age_seconds: float = Field(
        default=24 * 3600,
        gt=0,
        description="A count older than this is recounted from storage at the next check.",
    )
    storage_usage_settle_seconds: float = Field(
        default=300,
        ge=0,
        description=(
            "After a presigned upload URL expires, how long an upload begun before may "
            "still be landing (checks recount from storage until then)."
        ),
    )
    storage_usage_stuck_seconds: float = Field(
        default=6 * 3600,
        gt=0,
        description=(
            "An upload that reserved bytes and has not finished for this long is taken "
            "as dead, so that a recount may replace what it reserved."
        ),
    )

    # Email when a job ends.
    email_sender_service: EmailSenderService = EmailSenderService.NONE
    email_sender_address: EmailStr | None = None
    email_sender_api_key: str | None = None
    email_sender_secret_key: SecretStr | None = None
    # Base URL of Mailjet's API; tests and proxies point it elsewhere.
    mailjet_api_url: str = "https://api.mailjet.com/"
    email_max_attempts: int = Field(default=8, ge=1)
    email_retry_max_seconds: float = Field(default=3600, gt=0)
    email_poll_seconds: float = Field(default=5, gt=0)
    frontend_url: str | None = None

    # GET /jobs/{id}?wait=SECONDS (user_api.jobs.watch).
    job_wait_max_seconds: float = Field(
        default=60, gt=0, le=3600, description="The longest wait a GET /jobs/{id} may ask for."
    )
    job_wait_poll_seconds: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description=(
            "How often a waiting request reads the job again, for changes another "
            "server process committed."
        ),
    )
    job_wait_max_waiting: int = Field(
        default=1000, ge=1, description="Requests that may wait for jobs at once, per process."
    )

    # Delivery of new jobs and cancellations to the worker API.
    forward_retry_max_seconds: float = Field(default=10.0, gt=0)
    forward_poll_seconds: float = Field(default=1.0, gt=0)

    # Resolved once here, so that the database URL is built without calling AWS again
    # and an unreadable secret stops the start instead of the first connection.
    @field_validator("database_secret", "local_auth_private_key", "email_sender_secret_key")
    @classmethod
    def _resolve_user_api_secrets(
        cls, value: SecretStr | None, info: ValidationInfo
    ) -> SecretStr | None:
        return resolve_secret_setting(value, str(info.field_name).upper())

    @model_validator(mode="after")
    def _check_user_api(self) -> Self:
        if self.auth is AuthMode.LOCAL and self.local_auth_private_key is None:
            raise ValueError("AUTH=local needs LOCAL_AUTH_PRIVATE_KEY (an Ed25519 PEM key)")
        if self.email_sender_service is EmailSenderService.MAILJET:
            missing = [
                name
                for name, value in (
                    ("EMAIL_SENDER_ADDRESS", self.email_sender_address),
                    ("EMAIL_SENDER_API_KEY", self.email_sender_api_key),
                    ("EMAIL_SENDER_SECRET_KEY", self.email_sender_secret_key),
                )
                if not value
            ]
            if missing:
                raise ValueError(f"EMAIL_SENDER_SERVICE=mailjet needs {', '.join(missing)}")
        if (self.bootstrap_admin_email is None) != (self.bootstrap_admin_password is None):
            raise ValueError(
                "set both BOOTSTRAP_ADMIN_EMAIL and BOOTSTRAP_ADMIN_PASSWORD, or neither"
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        secret = self.database_secret.get_secret_value() if self.database_secret else None
        return build_database_url(self.database_url, secret)
