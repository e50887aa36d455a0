"""An in-memory ``ExecutionBackend`` for tests of the runner loop.

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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from worker_runner.backends.base import (
    DEFAULT_STOP_GRACE_S,
    BackendError,
    ExecutionBackend,
    ImageUnavailable,
    RunHandle,
    RunRequest,
    RunResult,
)

# What a shell killed by the SIGTERM of a stop exits with.
STOPPED_EXIT_CODE = 143
OOM_EXIT_CODE = 137
# Leftovers have no folder of their own.
_NOWHERE = Path("/nonexistent")


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


class FakeBackend(ExecutionBackend):
    """Runs nothing; plays ``FakeProgram``\\s. Thread-safe."""

    def __init__(
        self,
        programs: Mapping[str, FakeProgram] | None = None,
        *,
        default: FakeProgram | None = None,
        missing_images: set[str] | None = None,
        start_error: str | None = None,
    ) -> None:
        self.programs = dict(programs or {})
        self.default = default or FakeProgram()
        self.missing_images = set(missing_images or ())
        self.start_error = start_error
        self.requests: list[RunRequest] = []
        self.stopped: list[str] = []
        self.removed: list[str] = []
        self._runs: dict[str, _FakeRun] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def add_leftover(self, labels: Mapping[str, str]) -> RunHandle:
        """Pretend a run with ``labels`` survived an earlier runner (still running)."""
        request = RunRequest(image="leftover", command=(), host_folder=_NOWHERE, labels=labels)
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
            path = request.host_folder / relative
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

    def wait(self, handle: RunHandle, timeout: float | None) -> RunResult | None:
        run = self._run(handle)
        if not run.done.wait(timeout):
            return None
        return run.result

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
