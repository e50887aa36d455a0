"""Batch's job states, and how a job that ended did.

``SUBMITTED``, ``PENDING``, ``RUNNABLE`` and ``STARTING`` mean the job waits for
a place; ``RUNNING`` that its container runs; ``SUCCEEDED`` and ``FAILED`` that it
ended. What the emulator (moto) does not model, and how the real service's
behaviour is handled:

- exit codes: moto's DescribeJobs carries no ``container.exitCode``. A
  ``SUCCEEDED`` job without one exited 0. A ``FAILED`` one without one is looked
  up in ``ListJobs`` (whose summaries carry it, on moto too); on the real
  service a ``FAILED`` job without an exit code never ran its container (an
  image that cannot be pulled, an instance lost) and fails as a system error
  carrying Batch's ``statusReason``;
- retries: jobs are submitted without a retry strategy (one attempt), since the
  worker API re-queues a failed attempt where that is wanted; moto ignores
  retries anyway;
- time limits: ``attemptDurationSeconds`` ends a job with the ``statusReason``
  "Job attempt duration exceeded timeout"; the runner's own deadline comes
  first (see ``BatchBackend.attempt_duration``), so this is only a backstop for
  a runner that died;
- out of memory: the real service says so in ``container.reason``
  ("OutOfMemoryError: Container killed due to memory usage").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from worker_runner.backends.base import RunResult

WAITING_STATES = ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING")
ACTIVE_STATES = (*WAITING_STATES, "RUNNING")
STARTED_STATES = frozenset({"RUNNING", "SUCCEEDED", "FAILED"})
ENDED_STATES = frozenset({"SUCCEEDED", "FAILED"})
TIMEOUT_REASON = "Job attempt duration exceeded timeout"
OOM_REASON = "OutOfMemoryError"
# What a run without an exit code reports (as the Docker backend does for a
# container whose engine lost it).
UNKNOWN_EXIT = -1


def result_of(job: Mapping[str, Any], exit_code: int | None, stopping: bool) -> RunResult:
    """How the ended job ``job`` (a DescribeJobs entry) did, given its exit code
    (``None``: unknown) and whether this runner was stopping it."""
    reason = job.get("statusReason")
    container = job.get("container") or {}
    container_reason = str(container.get("reason") or "")
    if job.get("status") == "SUCCEEDED":
        return RunResult(exit_code=exit_code if exit_code is not None else 0)
    if exit_code is not None:
        return RunResult(
            exit_code=exit_code,
            oom_killed=OOM_REASON in container_reason,
            error=None if exit_code else f"AWS Batch: {reason or 'FAILED'}",
        )
    if stopping:
        # Terminated by this runner: the caller knows why.
        return RunResult(exit_code=UNKNOWN_EXIT, error=f"AWS Batch: {reason or 'terminated'}")
    if reason == TIMEOUT_REASON:
        return RunResult(exit_code=UNKNOWN_EXIT, error=f"AWS Batch stopped it: {reason}")
    detail = "; ".join(part for part in (reason, container_reason) if part) or "no reason given"
    return RunResult(
        exit_code=UNKNOWN_EXIT,
        error=f"AWS Batch: the job FAILED without running to an exit code ({detail})",
    )
