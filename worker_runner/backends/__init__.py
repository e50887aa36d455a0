"""Execution backends: where a job's container runs (see ``base``)."""

from __future__ import annotations

from worker_runner.backends.base import (
    BackendError,
    ExecutionBackend,
    ImageUnavailable,
    RunHandle,
    RunRequest,
    RunResult,
)

__all__ = [
    "BackendError",
    "ExecutionBackend",
    "ImageUnavailable",
    "RunHandle",
    "RunRequest",
    "RunResult",
]
