"""Bounds of the live logs, read from the worker API's environment and ``.env``."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class LiveLogSettings(BaseSettings):
    """How much of a job's output the worker API keeps, and how fast it takes it."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

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
