"""The interface between the runner loop and whatever runs a job's container.

The loop stages the job folder, then asks a backend to ``start`` a run, follows its
output with ``stream_logs``, polls ``wait`` (so it can react to time-outs, abandoned
jobs and shutdown in between), ``stop``\\s it when needed and always ``remove``\\s it.
Runs carry labels naming the worker, so a restarted runner can find and remove what
its previous life left behind (``find_leftovers`` / ``remove_leftovers``).

Implementations: ``worker_runner.backends.docker.DockerBackend`` (the local Docker
engine) and ``worker_runner.backends.fake.FakeBackend`` (in memory, for tests of the
loop). All methods block; the runner calls them from its slot threads.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from worker_runner import RunnerError

MOUNT_POINT = "/files"
DEFAULT_STOP_GRACE_S = 5.0


class BackendError(RunnerError):
    """The execution backend failed."""


class ImageUnavailable(BackendError):
    """The job's image is not available on this host and could not be pulled."""


@dataclass(frozen=True, slots=True)
class RunRequest:
    """One container run.

    ``host_folder`` is the job's ``files`` folder as the Docker host sees it; it is
    mounted read-write at ``/files``. ``memory`` is in MiB, ``cpus`` may be
    fractional; ``None`` means unlimited. ``gpus`` are device ids (``nvidia-smi``
    indices) to expose; empty means no GPU."""

    image: str
    command: tuple[str, ...]
    host_folder: Path
    env: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    memory: int | None = None
    cpus: float | None = None
    gpus: tuple[str, ...] = ()
    network: str = "none"
    # Most processes (and threads) the run may have at once: a fork bomb stops there
    # instead of exhausting the host. ``None``: the engine's default (unlimited).
    pids_limit: int | None = None
    # "uid" or "uid:gid" to run as; ``None``: the image's user.
    user: str | None = None
    # The image's root file system read-only; ``/files`` and a tmpfs ``/tmp`` stay
    # writable.
    read_only_root: bool = False


@dataclass(frozen=True, slots=True)
class RunHandle:
    """Names a started run (a container id on Docker)."""

    id: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RunResult:
    """How a run ended.

    ``oom_killed`` is set only when the engine says the memory limit killed the run.
    ``outside_signal`` is the signal someone other than this backend sent through
    the engine (``docker kill``, ``docker stop``, ``docker rm -f``), when the engine
    recorded one."""

    exit_code: int
    oom_killed: bool = False
    error: str | None = None
    outside_signal: int | None = None


class ExecutionBackend(abc.ABC):
    """Runs job containers. See the module docstring for how the loop uses it."""

    @abc.abstractmethod
    def start(self, request: RunRequest) -> RunHandle:
        """Create and start a run. A missing image is pulled once; raises
        ``ImageUnavailable`` when that fails and ``BackendError`` when the run cannot
        start (nothing is left behind in either case)."""

    @abc.abstractmethod
    def wait(self, handle: RunHandle, timeout: float | None) -> RunResult | None:
        """Wait up to ``timeout`` seconds (``None``: no limit) for the run to end;
        ``None`` when it is still running."""

    @abc.abstractmethod
    def stop(self, handle: RunHandle, grace: float = DEFAULT_STOP_GRACE_S) -> None:
        """Ask the run to stop (SIGTERM), killing it after ``grace`` seconds. A run
        that is already gone is not an error."""

    @abc.abstractmethod
    def remove(self, handle: RunHandle) -> None:
        """Remove the run and its resources, stopping it first if needed. A run
        that is already gone is not an error."""

    @abc.abstractmethod
    def stream_logs(self, handle: RunHandle) -> Iterator[bytes]:
        """The run's stdout and stderr from its start, following it until it ends."""

    @abc.abstractmethod
    def find_leftovers(self, labels: Mapping[str, str]) -> list[RunHandle]:
        """Runs (running or not) that carry all of ``labels``."""

    def remove_leftovers(self, labels: Mapping[str, str]) -> int:
        """Remove every run carrying all of ``labels``; returns how many."""
        leftovers = self.find_leftovers(labels)
        for handle in leftovers:
            self.remove(handle)
        return len(leftovers)

    def close(self) -> None:  # noqa: B027  # optional hook: most backends hold nothing
        """Release connections to the engine."""
