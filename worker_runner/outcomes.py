"""How a job failed: the reason its owner reads and the kind of failure.

Every failure of a job is a ``JobFailed`` carrying a ``FailureKind``:
``user_error`` when the job itself failed (a non-zero exit, killed by its memory
limit, results or log refused by the owner's storage limit, an input path leaving
its folder), ``system_error`` when LabCloud or the host did (an image that cannot
be pulled, the engine, storage, a spec the API should not have sent, a kill from
outside the runner), ``timed_out`` past the job's ``timeout``. A cancelled job is
not reported by the runner at all (the worker API answered 404).
"""

from __future__ import annotations

from labcloud.contract import FailureKind
from worker_runner import RunnerError
from worker_runner.backends.base import RunResult

# 128 + SIGKILL: what a run killed by the kernel (or a stop's deadline) exits with.
SIGKILL_EXIT_CODE = 137


class JobFailed(RunnerError):
    """The job failed."""

    def __init__(
        self, message: str | None = None, kind: FailureKind = FailureKind.SYSTEM_ERROR
    ) -> None:
        super().__init__(message)
        self.kind = kind


def failure_of(result: RunResult, memory: int | None) -> JobFailed | None:
    """Why a run that ended with ``result`` failed, or ``None`` when it did not."""
    if result.oom_killed:
        limit = f" at {memory} MiB" if memory is not None else ""
        return JobFailed(
            f"memory limit exceeded: killed{limit} (exit code {result.exit_code})",
            FailureKind.USER_ERROR,
        )
    if result.outside_signal is not None:
        return JobFailed(
            f"killed from outside the runner: signal {result.outside_signal} sent through "
            f"the container engine (exit code {result.exit_code})",
            FailureKind.SYSTEM_ERROR,
        )
    if result.exit_code == SIGKILL_EXIT_CODE:
        # Only the engine's flag says "out of memory": a guess from the exit code
        # blamed the job for kills from outside (another stack's cleanup). The flag
        # is lost now and then when a container dies at once (measured: 5 of 60 OOM
        # kills, 4 at a time), so the text leaves that open without claiming it; the
        # job's own memory remains the likelier cause.
        return JobFailed(
            f"exit code {SIGKILL_EXIT_CODE}: killed with SIGKILL, not by the runner; the "
            "container engine reported no out-of-memory kill",
            FailureKind.USER_ERROR,
        )
    if result.exit_code < 0 and result.error:
        # The run never reached an exit code of its own (a cloud job that never
        # started its container, or one lost by its scheduler): not the job's doing.
        return JobFailed(result.error, FailureKind.SYSTEM_ERROR)
    if result.exit_code != 0:
        reason = f"exit code {result.exit_code}"
        return JobFailed(
            f"{reason}: {result.error}" if result.error else reason, FailureKind.USER_ERROR
        )
    return None
