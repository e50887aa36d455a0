"""Runs jobs as containers on the local Docker engine.

Containers run with ``init`` (so a stop takes a fraction of a second), the job's
memory and CPU limits, no swap beyond the memory limit, a PIDs limit, all
capabilities dropped, ``no-new-privileges``, the configured network mode (``none``
by default) and only the GPUs assigned to the job; on request as another user and
with a read-only root file system (``/files`` and a tmpfs ``/tmp`` stay writable).
A container that was created but failed to start (a GPU request on a host without
the NVIDIA runtime does that) is removed at once.

How a run ended is what the engine says: an out-of-memory kill only when the
container's ``State.OOMKilled`` is set, and a kill from outside (``docker kill``,
``docker rm -f``, another program's cleanup) when the engine recorded a ``kill``
event for the container that this backend did not send.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.models.containers import Container
from docker.types import DeviceRequest

from worker_runner.backends.base import (
    DEFAULT_STOP_GRACE_S,
    MOUNT_POINT,
    BackendError,
    ExecutionBackend,
    ImageUnavailable,
    RunHandle,
    RunRequest,
    RunResult,
)

logger = logging.getLogger(__name__)

# Options of the tmpfs mounted at /tmp under a read-only root: writable by any user
# (the run may not be root). Its pages count against the container's memory limit.
TMPFS_OPTIONS = "rw,nosuid,nodev,mode=1777"
# Slack on the event query's window, against clock rounding (events carry seconds).
EVENT_SLACK_S = 2.0


def _explain(exc: DockerException) -> str:
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc)


class DockerBackend(ExecutionBackend):
    """``ExecutionBackend`` on a Docker engine (``docker.from_env()`` by default)."""

    def __init__(self, client: docker.DockerClient | None = None, *, pull_missing: bool = True):
        self._client = client
        self._pull_missing = pull_missing
        self._lock = threading.Lock()
        self._exits: dict[str, Future[RunResult]] = {}
        # Containers this backend stopped or removed: their kill events are ours.
        self._stopped: set[str] = set()
        self._engine_cpus: int | None = None

    @classmethod
    def from_env(cls, *, max_pool_size: int = 10) -> DockerBackend:
        """Connect to the engine named by ``DOCKER_HOST`` (or the local socket).

        Each running job holds two streaming connections (wait and logs), so the
        pool must be sized to the number of slots."""
        try:
            client = docker.from_env(max_pool_size=max_pool_size)
            client.ping()
        except DockerException as exc:
            raise BackendError(f"cannot reach the Docker engine: {exc}") from exc
        return cls(client)

    @property
    def client(self) -> docker.DockerClient:
        """The Docker client, connected on first use."""
        if self._client is None:
            try:
                self._client = docker.from_env()
            except DockerException as exc:
                raise BackendError(f"cannot reach the Docker engine: {exc}") from exc
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    # -- starting --------------------------------------------------------------

    def _nano_cpus(self, cpus: float) -> int:
        # The engine refuses a CPU limit above its own core count; a job asking for
        # more than the host has gets all of it rather than failing.
        if self._engine_cpus is None:
            try:
                self._engine_cpus = int(self.client.info().get("NCPU") or 0) or None
            except DockerException:
                self._engine_cpus = None
        if self._engine_cpus is not None:
            cpus = min(cpus, float(self._engine_cpus))
        return int(cpus * 1e9)

    def _create_options(self, request: RunRequest) -> dict[str, Any]:
        options: dict[str, Any] = {
            "command": list(request.command),
            "environment": dict(request.env),
            "labels": dict(request.labels),
            "volumes": {str(request.host_folder): {"bind": MOUNT_POINT, "mode": "rw"}},
            "init": True,
            "network_mode": request.network,
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
        }
        if request.memory is not None:
            options["mem_limit"] = f"{request.memory}m"
            # Equal to the memory limit: no swap, so exceeding it is an OOM kill
            # rather than a crawl.
            options["memswap_limit"] = f"{request.memory}m"
        if request.cpus is not None:
            options["nano_cpus"] = self._nano_cpus(request.cpus)
        if request.gpus:
            options["device_requests"] = [
                DeviceRequest(device_ids=list(request.gpus), capabilities=[["gpu"]])
            ]
        if request.pids_limit is not None:
            options["pids_limit"] = request.pids_limit
        if request.user is not None:
            options["user"] = request.user
        if request.read_only_root:
            options["read_only"] = True
            # A path inside the container, not a temporary file of this host.
            options["tmpfs"] = {"/tmp": TMPFS_OPTIONS}  # noqa: S108
        return options

    def _create(self, request: RunRequest) -> Container:
        options = self._create_options(request)
        try:
            return self.client.containers.create(request.image, **options)
        except ImageNotFound:
            if not self._pull_missing:
                raise ImageUnavailable(f"image {request.image} is not available locally") from None
        except APIError as exc:
            raise BackendError(f"could not create a container: {_explain(exc)}") from exc
        logger.info("pulling image %s", request.image)
        try:
            self.client.images.pull(request.image)
        except DockerException as exc:
            raise ImageUnavailable(
                f"image {request.image} is not available locally and pulling it failed: "
                f"{_explain(exc)}"
            ) from exc
        try:
            return self.client.containers.create(request.image, **options)
        except DockerException as exc:
            raise BackendError(f"could not create a container: {_explain(exc)}") from exc

    def start(self, request: RunRequest) -> RunHandle:
        started_at = time.time()
        container = self._create(request)
        try:
            container.start()
        except DockerException as exc:
            self._force_remove(container.id or "")
            raise BackendError(f"could not start the container: {_explain(exc)}") from exc
        handle = RunHandle(id=container.id or "", labels=dict(request.labels))
        exit_future: Future[RunResult] = Future()
        with self._lock:
            self._exits[handle.id] = exit_future
        threading.Thread(
            target=self._wait_for_exit,
            args=(container, exit_future, started_at),
            name=f"docker-wait-{handle.id[:12]}",
            daemon=True,
        ).start()
        return handle

    # -- following a run -------------------------------------------------------

    def _wait_for_exit(
        self, container: Container, exit_future: Future[RunResult], started_at: float
    ) -> None:
        """Block on the engine's wait (no client-side time-out) and publish the
        result; the loop polls the future with its own time-outs."""
        try:
            status = container.wait()
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
            events = self.client.events(
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

    def wait(self, handle: RunHandle, timeout: float | None) -> RunResult | None:
        with self._lock:
            exit_future = self._exits.get(handle.id)
        if exit_future is None:
            return self._inspect_exit(handle)
        try:
            return exit_future.result(timeout=timeout)
        except FutureTimeout:
            return None

    def _inspect_exit(self, handle: RunHandle) -> RunResult | None:
        # A run this process did not start (a leftover): ask the engine directly.
        try:
            container = self.client.containers.get(handle.id)
        except NotFound as exc:
            raise BackendError(f"container {handle.id[:12]} is gone") from exc
        state = container.attrs.get("State", {})
        if state.get("Running"):
            return None
        return RunResult(
            exit_code=int(state.get("ExitCode", -1)), oom_killed=bool(state.get("OOMKilled"))
        )

    def stream_logs(self, handle: RunHandle) -> Iterator[bytes]:
        try:
            container = self.client.containers.get(handle.id)
            stream = container.logs(stdout=True, stderr=True, stream=True, follow=True)
        except NotFound:
            return
        except DockerException as exc:
            raise BackendError(f"cannot read the logs of {handle.id[:12]}: {exc}") from exc
        try:
            yield from stream
        except (DockerException, requests.RequestException) as exc:
            # The container was removed under the stream: the run is over anyway.
            logger.debug("log stream of %s ended: %s", handle.id[:12], exc)
        finally:
            stream.close()

    # -- ending a run ----------------------------------------------------------

    def stop(self, handle: RunHandle, grace: float = DEFAULT_STOP_GRACE_S) -> None:
        with self._lock:
            self._stopped.add(handle.id)
        try:
            self.client.containers.get(handle.id).stop(timeout=max(0, round(grace)))
        except NotFound:
            return
        except DockerException as exc:
            raise BackendError(f"could not stop {handle.id[:12]}: {_explain(exc)}") from exc

    def _force_remove(self, container_id: str) -> None:
        try:
            self.client.api.remove_container(container_id, force=True, v=True)
        except NotFound:
            pass
        except APIError as exc:
            # Removal already in progress (a concurrent cleanup) is as good as done.
            if exc.status_code != 409:
                raise BackendError(
                    f"could not remove {container_id[:12]}: {_explain(exc)}"
                ) from exc

    def remove(self, handle: RunHandle) -> None:
        with self._lock:
            self._stopped.add(handle.id)
        self._force_remove(handle.id)
        with self._lock:
            self._exits.pop(handle.id, None)
            self._stopped.discard(handle.id)

    def find_leftovers(self, labels: Mapping[str, str]) -> list[RunHandle]:
        try:
            # ignore_removed: a container removed between the listing and its
            # inspection (a run ending meanwhile) is simply no longer a leftover.
            containers = self.client.containers.list(
                all=True,
                filters={"label": [f"{key}={value}" for key, value in labels.items()]},
                ignore_removed=True,
            )
        except DockerException as exc:
            raise BackendError(f"could not list containers: {_explain(exc)}") from exc
        return [
            RunHandle(id=container.id or "", labels=dict(container.labels or {}))
            for container in containers
        ]
