"""Execution backends: where a job's container runs and what it may take (see
``base`` for the interface, ``registry`` for the ``BACKEND`` setting)."""

from __future__ import annotations

from worker_runner.backends.base import (
    BackendError,
    BackendSettings,
    Capacity,
    ExecutionBackend,
    ImageUnavailable,
    Placement,
    RunHandle,
    RunRequest,
    RunResult,
)

__all__ = [
    "BackendError",
    "BackendSettings",
    "Capacity",
    "ExecutionBackend",
    "ImageUnavailable",
    "Placement",
    "RunHandle",
    "RunRequest",
    "RunResult",
]
