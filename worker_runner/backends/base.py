"""The interface between the runner and whatever runs a job's container.

A backend owns placement and execution:

- **capacity**: ``capacity()`` says what the runner may offer in a pull right now
  (the hardware query of ``GET /jobs`` and how many jobs to lease), ``None`` when
  it is full; ``reserve(needs)`` sets aside what one leased job needs (a
  ``Placement``: its limits, and the GPU devices where the backend picks them) and
  ``release`` gives it back; ``unfit_reason`` says why a job could never run here;
- **runs**: ``start`` a run of a ``RunRequest``, ``follow`` it (a future that
  completes when it ends; a backend that polls does so for all its runs at once,
  every ``poll_interval`` seconds, through ``poll``), ``stream_logs``, ``stop`` and
  always ``remove`` it. Runs carry labels naming the runner, so a restarted runner
  can find and remove what its previous life left (``find_leftovers``);
- **the job folders**: each job's files live under ``job_root`` (``PATH_BASE``), on
  the runner's disk or on a file system the backend's runs share; the backend maps
  that folder to what its runs see.

Each backend has a settings class (a ``BackendSettings``) read from the runner's
environment and env file, and is chosen by the runner's ``BACKEND`` setting
(``worker_runner.backends.registry``). Implementations:
``worker_runner.backends.docker.DockerBackend`` (the local Docker engine) and
``worker_runner.backends.fake.FakeBackend`` (in memory, for tests of the runner).
All methods block; the runner calls them from its threads.
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from labcloud.contract import ContainerSpec, HardwareSpec
from worker_runner import RunnerError

logger = logging.getLogger(__name__)

MOUNT_POINT = "/files"
DEFAULT_STOP_GRACE_S = 5.0
# How long a poll of the runs may keep failing (an engine or a cloud API that is
# away) before the runs followed are given up as lost.
POLL_PATIENCE_S = 60.0


class BackendError(RunnerError):
    """The execution backend failed."""


class ImageUnavailable(BackendError):
    """The job's image is not available on this host and could not be pulled."""


class BackendSettings(BaseSettings):
    """What every backend is configured with; a backend's own settings class
    extends it. Read from the same environment and env file as the runner's."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    path_base: Path = Field(
        default=Path("./.labcloud/jobs"),
        description=(
            "Folder holding one folder per job, as the runner sees it: its own disk, "
            "or a file system shared with where the backend runs jobs."
        ),
    )
    slots: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Most jobs run at the same time (as many as fit in what is free).",
    )

    @model_validator(mode="after")
    def _resolve_path_base(self) -> BackendSettings:
        # Mounts need absolute paths, and the folder must not move if the process
        # changes its working directory later.
        self.path_base = self.path_base.expanduser().resolve()
        return self


@dataclass(frozen=True, slots=True)
class Capacity:
    """What the runner offers in one pull (the hardware query of ``GET /jobs``):
    the most ``memory`` (MiB) and ``cpu_cores`` one job may need, ``gpus`` GPUs of
    one kind (``gpu_mem`` MiB each, ``gpu_model``, ``gpu_archi``), and ``limit``,
    how many jobs the pull may lease (each fitting the rest of the offer)."""

    memory: int
    cpu_cores: int
    gpus: int = 0
    gpu_mem: int = 0
    gpu_model: str | None = None
    gpu_archi: str | None = None
    limit: int = 1

    def query(self) -> dict[str, str | int]:
        """The hardware parameters of the pull (``limit`` goes separately)."""
        params: dict[str, str | int] = {
            "memory": self.memory,
            "cpu_cores": self.cpu_cores,
            "gpus": self.gpus,
            "gpu_mem": self.gpu_mem,
        }
        if self.gpu_model is not None:
            params["gpu_model"] = self.gpu_model
        if self.gpu_archi is not None:
            params["gpu_archi"] = self.gpu_archi
        return params


# eq=False: a placement is one reservation, told apart from an equal one by identity
# (a backend may keep its own bookkeeping keyed by it).
@dataclass(frozen=True, slots=True, eq=False)
class Placement:
    """What a backend set aside for one job, until ``release``: the run's limits
    (``memory`` in MiB, ``cpus`` possibly fractional; ``None``: unlimited), how many
    ``gpus`` it gets, and ``gpu_ids``, the devices it gets where the backend picks
    them (a local host); a backend whose scheduler picks them leaves it empty."""

    memory: int | None = None
    cpus: float | None = None
    gpus: int = 0
    gpu_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RunRequest:
    """One run of a job, as every backend needs it.

    ``folder`` is the job's ``files`` folder under the backend's ``job_root``, as
    the runner sees it; the run sees it read-write at ``/files`` (the backend maps
    it to what its runs see). ``placement`` gives the limits and devices;
    ``container`` the job's confinement (a ``pids_limit`` of ``None``: the
    backend's default); ``timeout`` the job's limit in seconds, which the runner
    enforces and a backend may hand to its scheduler too."""

    image: str
    command: tuple[str, ...]
    folder: Path
    env: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    placement: Placement = field(default_factory=Placement)
    container: ContainerSpec = field(default_factory=ContainerSpec)
    timeout: int | None = None


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
    """Places and runs jobs. See the module docstring for how the runner uses it."""

    def __init__(self, *, poll_interval: float = 1.0) -> None:
        # Seconds between two ``poll``\\s of the runs followed (a backend whose
        # ``follow`` its engine wakes never polls).
        self.poll_interval = poll_interval
        self._poller_lock = threading.Lock()
        self._poller: RunPoller | None = None

    # -- placement -------------------------------------------------------------

    @property
    @abc.abstractmethod
    def job_root(self) -> Path:
        """The folder holding one folder per job, as the runner sees it."""

    @property
    def identity(self) -> str:
        """What tells this runner's runs and job folders apart from those of
        another runner with the same account (mixed into the runner's id): by
        default, the job root."""
        return str(self.job_root)

    @abc.abstractmethod
    def capacity(self) -> Capacity | None:
        """What a pull may ask for now; ``None`` when nothing more can be taken."""

    @abc.abstractmethod
    def reserve(self, needs: HardwareSpec) -> Placement | None:
        """Set aside what a job with ``needs`` holds while it runs; ``None`` when
        that is not free now."""

    @abc.abstractmethod
    def release(self, placement: Placement) -> None:
        """Give back what ``reserve`` set aside, once the job ended."""

    @abc.abstractmethod
    def unfit_reason(self, needs: HardwareSpec) -> str | None:
        """Why a job with ``needs`` could never run here (even idle); ``None``
        when it could."""

    # -- runs ------------------------------------------------------------------

    # True for a backend whose runs may wait for a place after ``start`` (a cloud
    # scheduler's queue): the runner then reports a job ``running``, and counts its
    # time limit, from when ``started`` says its run is.
    queues_runs = False

    def started(self, handle: RunHandle) -> bool:
        """Whether the run's container has started; by default as soon as
        ``start`` returned."""
        return True

    @abc.abstractmethod
    def start(self, request: RunRequest) -> RunHandle:
        """Create and start a run. A missing image is pulled once; raises
        ``ImageUnavailable`` when that fails and ``BackendError`` when the run cannot
        start (nothing is left behind in either case)."""

    def follow(self, handle: RunHandle) -> Future[RunResult]:
        """A future that completes with the run's result when it ends (or fails
        with ``BackendError`` when the backend lost track of it). By default the
        backend's ``poll`` is asked about every followed run at once, every
        ``poll_interval`` seconds; a backend its engine wakes overrides this."""
        with self._poller_lock:
            if self._poller is None:
                self._poller = RunPoller(self.poll, self.poll_interval)
            return self._poller.follow(handle)

    @abc.abstractmethod
    def poll(self, handles: Sequence[RunHandle]) -> Mapping[str, RunResult | BackendError]:
        """How the runs of ``handles`` that ended did, in one call, by handle id:
        their result, or the ``BackendError`` that makes their end unknowable (a
        run the backend no longer knows). Runs still going are left out."""

    def wait(self, handle: RunHandle, timeout: float | None) -> RunResult | None:
        """Wait up to ``timeout`` seconds (``None``: no limit) for the run to end;
        ``None`` when it is still running."""
        try:
            return self.follow(handle).result(timeout=timeout)
        except FutureTimeout:
            return None

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

    def close(self) -> None:
        """Stop following runs and release connections to the engine."""
        with self._poller_lock:
            poller, self._poller = self._poller, None
        if poller is not None:
            poller.close()


PollFunction = Callable[[Sequence[RunHandle]], Mapping[str, RunResult | BackendError]]


class RunPoller:
    """Follows runs for a backend that learns how they ended by asking: one
    thread asks about all of them in one ``poll`` every ``interval`` seconds (one
    request to a cloud scheduler for every job in flight, not one per job)."""

    def __init__(self, poll: PollFunction, interval: float) -> None:
        self._poll = poll
        self._interval = interval
        self._followed: dict[str, tuple[RunHandle, Future[RunResult]]] = {}
        self._changed = threading.Condition()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def follow(self, handle: RunHandle) -> Future[RunResult]:
        """The future of ``handle``'s result (the same one for every call)."""
        with self._changed:
            if self._closed.is_set():
                raise BackendError("the backend is closed")
            entry = self._followed.get(handle.id)
            if entry is not None:
                return entry[1]
            future: Future[RunResult] = Future()
            self._followed[handle.id] = (handle, future)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="run-poller", daemon=True)
                self._thread.start()
            self._changed.notify()
            return future

    def close(self) -> None:
        """Stop polling; whoever still waits for a run learns it was not seen to end."""
        with self._changed:
            self._closed.set()
            entries = list(self._followed.values())
            self._followed.clear()
            self._changed.notify()
        for _, future in entries:
            future.set_exception(BackendError("the backend closed before the run ended"))

    def _next_batch(self) -> list[tuple[RunHandle, Future[RunResult]]]:
        with self._changed:
            self._changed.wait_for(lambda: self._followed or self._closed.is_set())
            return list(self._followed.values())

    def _run(self) -> None:
        failing_since: float | None = None
        while not self._closed.is_set():
            entries = self._next_batch()
            if not entries:
                continue
            try:
                results: Mapping[str, RunResult | BaseException] = self._poll(
                    [handle for handle, _ in entries]
                )
                failing_since = None
            except BackendError as exc:
                now = time.monotonic()
                failing_since = failing_since if failing_since is not None else now
                if now - failing_since < POLL_PATIENCE_S:
                    logger.warning("polling %d run(s) failed: %s", len(entries), exc.message)
                    self._closed.wait(self._interval)
                    continue
                results = {handle.id: exc for handle, _ in entries}
            except Exception as exc:
                # A bug, not an engine away: the runs' jobs fail saying so rather
                # than wait forever.
                logger.exception("polling %d run(s) failed", len(entries))
                results = {handle.id: exc for handle, _ in entries}
            self._settle(entries, results)
            self._closed.wait(self._interval)

    def _settle(
        self,
        entries: list[tuple[RunHandle, Future[RunResult]]],
        results: Mapping[str, RunResult | BaseException],
    ) -> None:
        for handle, future in entries:
            result = results.get(handle.id)
            if result is None:
                continue
            with self._changed:
                # Closing may have settled it meanwhile.
                if self._followed.pop(handle.id, None) is None:
                    continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
