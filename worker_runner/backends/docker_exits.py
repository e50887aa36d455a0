"""How containers of the Docker backend end: ``ExitWatch`` blocks on the engine's
wait for each run (a thread per run) and completes the run's future the moment the
container ends, with what the engine says about it: the exit code, an out-of-memory
kill (only when ``State.OOMKilled`` is set), and a kill from outside (a ``kill``
event for the container that the backend did not send).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import docker
import requests
from docker.errors import DockerException
from docker.models.containers import Container

from worker_runner.backends.base import BackendError, RunResult

logger = logging.getLogger(__name__)

# Slack on the event query's window, against clock rounding (events carry seconds).
EVENT_SLACK_S = 2.0
# The engine's wait blocks until the container ends; it is renewed after this many
# seconds, so that a closed backend's waiting threads end too.
ENGINE_WAIT_S = 60.0


def explain(exc: DockerException) -> str:
    """The engine's own words for a failure, when it gave any."""
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc)


class ExitWatch:
    """The futures of the runs a backend started, completed by the engine's wait.
    Thread-safe."""

    def __init__(self, client: Callable[[], docker.DockerClient]) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._exits: dict[str, Future[RunResult]] = {}
        # Containers the backend stopped or removed: their kill events are its own.
        self._stopped: set[str] = set()
        self._closed = threading.Event()

    def watch(self, container: Container, started_at: float) -> Future[RunResult]:
        """Start waiting for ``container`` (started at ``started_at``, epoch s)."""
        exit_future: Future[RunResult] = Future()
        with self._lock:
            self._exits[container.id or ""] = exit_future
        threading.Thread(
            target=self._wait_for_exit,
            args=(container, exit_future, started_at),
            name=f"docker-wait-{(container.id or '')[:12]}",
            daemon=True,
        ).start()
        return exit_future

    def future(self, container_id: str) -> Future[RunResult] | None:
        """The future of a run being watched, or None (one this process did not start)."""
        with self._lock:
            return self._exits.get(container_id)

    def stopping(self, container_id: str) -> None:
        """The backend is about to stop or remove the container: its kills are ours."""
        with self._lock:
            self._stopped.add(container_id)

    def forget(self, container_id: str) -> None:
        """The container was removed."""
        with self._lock:
            self._exits.pop(container_id, None)
            self._stopped.discard(container_id)

    def close(self) -> None:
        """Let the waiting threads end at their next renewal."""
        self._closed.set()

    def _wait_for_exit(
        self, container: Container, exit_future: Future[RunResult], started_at: float
    ) -> None:
        """Block on the engine's wait and publish the result the moment the
        container ends; the wait is renewed every ``ENGINE_WAIT_S`` seconds until
        the backend closes."""
        try:
            while True:
                try:
                    status = container.wait(timeout=ENGINE_WAIT_S)
                    break
                except requests.exceptions.ReadTimeout:
                    if self._closed.is_set():
                        raise BackendError("the backend closed before the run ended") from None
                except requests.exceptions.ConnectionError as exc:
                    # docker-py reports a read time-out of its socket this way.
                    if "timed out" not in str(exc) or self._closed.is_set():
                        raise
            container.reload()
            state = container.attrs.get("State", {})
            wait_error = status.get("Error")
            error = (wait_error["Message"] if wait_error else None) or state.get("Error") or None
            exit_code = int(status["StatusCode"])
            oom_killed = bool(state.get("OOMKilled", False))
            outside_signal = None
            if exit_code != 0 and not oom_killed:
                outside_signal = self._outside_signal(container.id or "", started_at)
            exit_future.set_result(
                RunResult(
                    exit_code=exit_code,
                    oom_killed=oom_killed,
                    error=error,
                    outside_signal=outside_signal,
                )
            )
        except BackendError as exc:
            exit_future.set_exception(exc)
        except (DockerException, requests.RequestException) as exc:
            exit_future.set_exception(BackendError(f"lost track of the container: {exc}"))

    def _outside_signal(self, container_id: str, started_at: float) -> int | None:
        """The last signal the engine delivered to the container on someone else's
        behalf (its ``kill`` events; a stop or a forced removal makes them too),
        or ``None``. The engine keeps recent events only: this is asked right after
        the exit, while they are among them."""
        with self._lock:
            if container_id in self._stopped:
                return None
        try:
            events = self._client().events(
                since=int(started_at - EVENT_SLACK_S),
                until=int(time.time() + EVENT_SLACK_S),
                filters={"type": "container", "container": container_id, "event": "kill"},
                decode=True,
            )
            signals = [
                str(event.get("Actor", {}).get("Attributes", {}).get("signal", ""))
                for event in events
            ]
        except (DockerException, requests.RequestException) as exc:
            logger.warning("could not read the events of %s: %s", container_id[:12], exc)
            return None
        with self._lock:
            # A stop of ours may have raced the exit.
            if container_id in self._stopped:
                return None
        for signal in reversed(signals):
            if signal.isdigit():
                return int(signal)
        return None
