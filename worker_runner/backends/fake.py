"""An in-memory ``ExecutionBackend`` for tests of the runner (``BACKEND=fake``).

It is a backend like any other: its settings (``FakeSettings``) come from the same
environment and env file, it places jobs on the hardware those settings describe
(``FAKE_CPU_CORES``, ``FAKE_MEMORY``; GPUs only when built in code) through a
``ResourcePool``, and it learns how its runs ended the way a cloud backend does, by
polling all of them at once every ``FAKE_POLL_INTERVAL`` seconds.

A ``FakeProgram`` says what a run of an image does: the log lines it prints, the
files it writes into its ``/files`` folder (written when it starts, as a tool writes
while it works), how long it takes, and how it ends (exit code, OOM kill, a signal
from outside). Images
listed in ``missing_images`` fail to start as a missing image would. The backend
records every request, stop and removal for assertions.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from pydantic import Field

from worker_runner.backends.base import (
    DEFAULT_STOP_GRACE_S,
    BackendError,
    BackendSettings,
    ExecutionBackend,
    ImageUnavailable,
    RunHandle,
    RunRequest,
    RunResult,
)
from worker_runner.hardware import GpuInfo, HostHardware, PlacedOnHost, ResourcePool

# What a shell killed by the SIGTERM of a stop exits with.
STOPPED_EXIT_CODE = 143
OOM_EXIT_CODE = 137
# Leftovers have no folder of their own.
_NOWHERE = Path("/nonexistent")


class FakeSettings(BackendSettings):
    """Settings of the fake backend: the hardware it pretends to have and how
    often it looks at its runs."""

    fake_cpu_cores: int = Field(default=4, ge=1, description="Cores the fake host has.")
    fake_memory: int = Field(default=8192, ge=6, description="Memory of the fake host (MiB).")
    fake_poll_interval: float = Field(
        default=0.02, gt=0, le=60, description="Seconds between two looks at the runs."
    )


@dataclass(frozen=True)
class FakeProgram:
    """Behaviour of a fake run. ``files`` maps paths relative to ``/files`` to their
    content; ``outside_signal`` ends it as a signal sent by someone else would
    (exit code 128 + the signal)."""

    exit_code: int = 0
    duration: float = 0.0
    log_lines: tuple[str, ...] = ()
    files: Mapping[str, bytes] = field(default_factory=dict)
    oom_killed: bool = False
    outside_signal: int | None = None


@dataclass
class _FakeRun:
    request: RunRequest
    program: FakeProgram
    done: threading.Event = field(default_factory=threading.Event)
    result: RunResult | None = None
    timer: threading.Timer | None = None


class FakeBackend(PlacedOnHost, ExecutionBackend):
    """Runs nothing; plays ``FakeProgram``\\s on the hardware of its settings
    (plus ``gpus``). Thread-safe."""

    def __init__(
        self,
        settings: FakeSettings,
        programs: Mapping[str, FakeProgram] | None = None,
        *,
        default: FakeProgram | None = None,
        gpus: tuple[GpuInfo, ...] = (),
        missing_images: set[str] | None = None,
        start_error: str | None = None,
    ) -> None:
        super().__init__(poll_interval=settings.fake_poll_interval)
        self.settings = settings
        self.programs = dict(programs or {})
        self.default = default or FakeProgram()
        self.missing_images = set(missing_images or ())
        self.start_error = start_error
        hardware = HostHardware(
            cpu_cores=settings.fake_cpu_cores, memory=settings.fake_memory, gpus=gpus
        )
        self._pool = ResourcePool(hardware, settings.slots)
        self.requests: list[RunRequest] = []
        self.stopped: list[str] = []
        self.removed: list[str] = []
        # How many runs each poll asked about (one call covers all of them).
        self.polls: list[int] = []
        self._runs: dict[str, _FakeRun] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: FakeSettings) -> Self:
        """A fake whose every run succeeds at once."""
        return cls(settings)

    # -- placement -------------------------------------------------------------

    @property
    def job_root(self) -> Path:
        return self.settings.path_base

    # -- runs ------------------------------------------------------------------

    def add_leftover(self, labels: Mapping[str, str]) -> RunHandle:
        """Pretend a run with ``labels`` survived an earlier runner (still running)."""
        request = RunRequest(image="leftover", command=(), folder=_NOWHERE, labels=labels)
        run = _FakeRun(request=request, program=self.default)
        handle = RunHandle(id=f"fake-{next(self._ids)}", labels=dict(labels))
        with self._lock:
            self._runs[handle.id] = run
        return handle

    def running(self) -> list[RunHandle]:
        """Runs started and not yet ended."""
        with self._lock:
            return [
                RunHandle(id=run_id, labels=dict(run.request.labels))
                for run_id, run in self._runs.items()
                if not run.done.is_set()
            ]

    def _finish(self, run: _FakeRun, result: RunResult) -> None:
        with self._lock:
            if run.done.is_set():
                return
            run.result = result
            run.done.set()

    def start(self, request: RunRequest) -> RunHandle:
        if request.image in self.missing_images:
            raise ImageUnavailable(
                f"image {request.image} is not available locally and pulling it failed"
            )
        if self.start_error is not None:
            raise BackendError(self.start_error)
        program = self.programs.get(request.image, self.default)
        for relative, content in program.files.items():
            path = request.folder / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        run = _FakeRun(request=request, program=program)
        handle = RunHandle(id=f"fake-{next(self._ids)}", labels=dict(request.labels))
        with self._lock:
            self.requests.append(request)
            self._runs[handle.id] = run
        exit_code = program.exit_code
        if program.oom_killed:
            exit_code = OOM_EXIT_CODE
        elif program.outside_signal is not None:
            exit_code = 128 + program.outside_signal
        result = RunResult(
            exit_code=exit_code,
            oom_killed=program.oom_killed,
            outside_signal=program.outside_signal,
        )
        if program.duration <= 0:
            self._finish(run, result)
        else:
            run.timer = threading.Timer(program.duration, self._finish, args=(run, result))
            run.timer.daemon = True
            run.timer.start()
        return handle

    def _run(self, handle: RunHandle) -> _FakeRun:
        with self._lock:
            run = self._runs.get(handle.id)
        if run is None:
            raise BackendError(f"no run {handle.id}")
        return run

    def poll(self, handles: Sequence[RunHandle]) -> dict[str, RunResult | BackendError]:
        ended: dict[str, RunResult | BackendError] = {}
        with self._lock:
            self.polls.append(len(handles))
            for handle in handles:
                run = self._runs.get(handle.id)
                if run is None:
                    ended[handle.id] = BackendError(f"no run {handle.id}")
                elif run.done.is_set() and run.result is not None:
                    ended[handle.id] = run.result
        return ended

    def stop(self, handle: RunHandle, grace: float = DEFAULT_STOP_GRACE_S) -> None:
        with self._lock:
            run = self._runs.get(handle.id)
            self.stopped.append(handle.id)
        if run is None:
            return
        if run.timer is not None:
            run.timer.cancel()
        self._finish(run, RunResult(exit_code=STOPPED_EXIT_CODE))

    def remove(self, handle: RunHandle) -> None:
        with self._lock:
            run = self._runs.pop(handle.id, None)
            self.removed.append(handle.id)
        if run is not None:
            if run.timer is not None:
                run.timer.cancel()
            # A follower of the logs must see the end of a removed run.
            run.done.set()

    def stream_logs(self, handle: RunHandle) -> Iterator[bytes]:
        run = self._run(handle)
        for line in run.program.log_lines:
            yield (line + "\n").encode()
        # Follow until the run ends, like ``docker logs --follow``.
        while not run.done.wait(0.05):
            pass

    def find_leftovers(self, labels: Mapping[str, str]) -> list[RunHandle]:
        with self._lock:
            return [
                RunHandle(id=run_id, labels=dict(run.request.labels))
                for run_id, run in self._runs.items()
                if all(run.request.labels.get(key) == value for key, value in labels.items())
            ]
