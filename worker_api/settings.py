"""Worker API settings (contract section 5), read from the environment and ``.env``."""

from __future__ import annotations

from typing import Self

from pydantic import Field, SecretStr, field_validator, model_validator

from labcloud.db import build_database_url
from labcloud.secrets import resolve_secret_setting
from labcloud.settings import ServiceSettings


class WorkerApiSettings(ServiceSettings):
    """Everything the worker API needs; it refuses to start on a missing or malformed
    value and names it."""

    queue_db_url: str = "sqlite:///./.labcloud/worker_api.db"
    queue_db_secret: SecretStr | None = Field(
        default=None,
        description="Fills the {} placeholder of QUEUE_DB_URL (a value or a Secrets Manager ARN).",
    )
    # Connections are opened as requests need them and up to DB_POOL_SIZE are kept
    # open; beyond that, up to DB_MAX_OVERFLOW more are opened and closed per use,
    # which costs a new server process on PostgreSQL each time. 20 covers the
    # requests one process serves at once under load without that churn.
    db_pool_size: int = Field(default=20, ge=1)
    db_max_overflow: int = Field(default=10, ge=0)
    db_pool_timeout: float = Field(default=30.0, gt=0)

    max_retries: int = Field(
        default=2, ge=0, description="Re-queues of a job whose worker went silent."
    )
    timeout_failure: float = Field(
        default=300.0,
        gt=0,
        description="Seconds without keep-alive before a leased job is re-queued or failed.",
    )
    retry_different: bool = Field(
        default=False,
        description="Never hand a re-queued job back to a worker that already failed it.",
    )
    cancel_log_grace_seconds: float = Field(
        default=120.0,
        ge=0,
        description=(
            "Seconds after a cancellation that keeps outputs during which the job's last "
            "worker may still upload its log."
        ),
    )

    userfacing_api_url: str = Field(description="Base URL of the user API (status callbacks).")
    local_auth_jwks_url: str | None = Field(
        default=None,
        description=(
            "JWKS of the user API's local tokens; default USERFACING_API_URL/.well-known/jwks.json."
        ),
    )
    public_url: str = Field(
        default="http://127.0.0.1:8001",
        description="External base URL of this API, used in signed download/upload links.",
    )
    # Live logs (worker_api.logs): how much of a job's output is kept, how fast it is taken.
    live_log_max_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        le=1024 * 1024 * 1024,
        description=(
            "Most bytes of one job's live log kept, the truncation marker included; "
            "a flood beyond is dropped (the final log file keeps everything)."
        ),
    )
    live_log_max_chunk_bytes: int = Field(
        default=256 * 1024,
        ge=1024,
        le=16 * 1024 * 1024,
        description="Largest chunk a runner may ship in one request (413 beyond).",
    )
    live_log_max_wait_seconds: float = Field(
        default=10.0,
        ge=0,
        le=60,
        description="Longest an internal read of a live log waits for new bytes.",
    )

    signed_url_expiry_seconds: int = Field(default=600, ge=10, le=7 * 24 * 3600)

    reaper_interval_seconds: float = Field(default=10.0, gt=0)
    max_wait_seconds: float = Field(
        default=30.0, ge=0, description="Upper bound of a long-polling pull's `wait`."
    )
    # Connected workers (worker_api.workers.presence): a worker seen (pull or
    # keep-alive) within the window is connected; the default covers two of the
    # longest long-polls and a margin. Its row is written at most once per
    # WORKER_RECORD_EVERY_SECONDS (and when its offer changes).
    worker_seen_window_seconds: float = Field(default=90.0, gt=0)
    worker_record_every_seconds: float = Field(default=5.0, ge=0)
    # Delivery of status changes to the user API.
    status_forward_poll_seconds: float = Field(default=1.0, gt=0)
    status_forward_retry_max_seconds: float = Field(default=10.0, gt=0)
    status_forward_timeout_seconds: float = Field(default=10.0, gt=0)
    # Whether a worker's account is still active (not disabled by an admin).
    account_check_ttl_seconds: float = Field(
        default=10.0,
        ge=0,
        description="Seconds an answer of the user API about an account is reused (0: never).",
    )
    account_check_timeout_seconds: float = Field(default=3.0, gt=0)

    # Resolved once here, so that the queue database's URL is built without calling AWS
    # again and an unreadable secret stops the start instead of the first connection.
    @field_validator("queue_db_secret")
    @classmethod
    def _resolve_queue_db_secret(cls, value: SecretStr | None) -> SecretStr | None:
        return resolve_secret_setting(value, "QUEUE_DB_SECRET")

    @model_validator(mode="after")
    def _normalise_urls(self) -> Self:
        self.userfacing_api_url = self.userfacing_api_url.rstrip("/")
        self.public_url = self.public_url.rstrip("/")
        if not self.userfacing_api_url.startswith(("http://", "https://")):
            raise ValueError("USERFACING_API_URL must be an http(s) URL")
        if not self.public_url.startswith(("http://", "https://")):
            raise ValueError("PUBLIC_URL must be an http(s) URL")
        return self

    @property
    def resolved_database_url(self) -> str:
        secret = self.queue_db_secret.get_secret_value() if self.queue_db_secret else None
        return build_database_url(self.queue_db_url, secret)

    @property
    def resolved_local_jwks_url(self) -> str:
        return self.local_auth_jwks_url or f"{self.userfacing_api_url}/.well-known/jwks.json"
