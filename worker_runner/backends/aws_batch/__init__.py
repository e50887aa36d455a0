"""The AWS Batch execution backend (``BACKEND=aws-batch``): see ``backend``."""

from __future__ import annotations

from worker_runner.backends.aws_batch.backend import BatchBackend, BatchCapacity
from worker_runner.backends.aws_batch.settings import BatchSettings

__all__ = ["BatchBackend", "BatchCapacity", "BatchSettings"]
