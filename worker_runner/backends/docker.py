"""Runs jobs as containers on a Docker engine, placed on this host's resources.

Capacity and placement come from the host's hardware (``ResourcePool``: cores,
memory, NVIDIA GPUs, ``SLOTS``); a job's container sees only the GPUs placed for
it. Job folders live under ``PATH_BASE``, mounted from ``PATH_HOST_BASE`` when the
runner itself runs in a container and the engine sees them elsewhere.

Containers run with ``init`` (so a stop takes a fraction of a second), the job's
memory and CPU limits, no swap beyond the memory limit, a PIDs limit, all
capabilities dropped, ``no-new-privileges``, the network mode of
``CONTAINER_NETWORK`` (``none`` by default) and only the GPUs placed for the job;
on request as another user and with a read-only root file system (``/files`` and
a tmpfs ``/tmp`` stay writable). A container that was created but failed to start
(a GPU request on a host without the NVIDIA runtime does that) is removed at once.

How a run ended is what the engine says: an out-of-memory kill only when the
container's ``State.OOMKilled`` is set, and a kill from outside (``docker kill``,
``docker rm -f``, another program's cleanup) when the engine recorded a ``kill``
event for the container that this backend did not send. The end of a run is
learnt from the engine's blocking wait (``docker_exits``), not by polling.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Self

import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.models.containers import Container
from docker.types import DeviceRequest
from pydantic import Field, model_validator

from worker_runner.backends.base import (
    DEFAULT_STOP_GRACE_S,
    MOUNT_POINT,
    BackendError,
    BackendSettings,
    ExecutionBackend,
    ImageUnavailable,
    RunHandle,
    RunRequest,
    RunResult,
)
from worker_runner.backends.docker_exits import ExitWatch, explain
from worker_runner.hardware import HostHardware, PlacedOnHost, ResourcePool, detect_hardware

logger = logging.getLogger(__name__)

# Options of the tmpfs mounted at /tmp under a read-only root: writable by any user
# (the run may not be root). Its pages count against the container's memory limit.
TMPFS_OPTIONS = "rw,nosuid,nodev,mode=1777"


class DockerSettings(BackendSettings):
    """Settings of the Docker backend (the names of the runner's settings before
    backends had their own)."""

    path_host_base: Path | None = Field(
        default=None,
        description=(
            "PATH_BASE as the Docker host sees it (when the runner itself runs in a "
            "container); defaults to PATH_BASE."
        ),
    )
    cpu_cores: int | None = Field(default=None, ge=1, description="Overrides the detected cores.")
    memory: int | None = Field(default=None, ge=6, description="Overrides detected memory (MiB).")
    container_network: str = Field(
        default="none", min_length=1, description="Docker network mode of job containers."
    )
    # A tool with a few hundred threads fits; a fork bomb stops long before the
    # host's own process table fills up.
    container_pids_limit: int = Field(
        default=1024,
        ge=8,
        le=4_194_304,
        description=(
            "Most processes and threads a job container may have at once (a catalog "
            "entrypoint's container.pids_limit overrides it)."
        ),
    )

    @model_validator(mode="after")
    def _check_host_base(self) -> Self:
        if self.path_host_base is not None and not self.path_host_base.is_absolute():
            raise ValueError("PATH_HOST_BASE must be an absolute path on the Docker host")
        return self

    @property
    def host_base(self) -> Path:
        """PATH_HOST_BASE, or PATH_BASE when the engine sees the same folders."""
        return self.path_host_base if self.path_host_base is not None else self.path_base


class DockerBackend(PlacedOnHost, ExecutionBackend):
    """``ExecutionBackend`` on a Docker engine (``docker.from_env()`` by default),
    placing jobs on this host's ``hardware`` (detected by ``from_settings``)."""

    def __init__(
        self,
        settings: DockerSettings,
        client: docker.DockerClient | None = None,
        *,
        hardware: HostHardware | None = None,
        pull_missing: bool = True,
    ) -> None:
        super().__init__()
        self.settings = settings
        self._client = client
        self._pull_missing = pull_missing
        self._pool = ResourcePool(
            hardware or HostHardware(cpu_cores=1, memory=settings.memory or 1024), settings.slots
        )
        self._exits = ExitWatch(lambda: self.client)
        self._engine_cpus: int | None = None

    @classmethod
    def from_settings(cls, settings: DockerSettings) -> Self:
        """Detect this host's hardware and connect to the engine named by
        ``DOCKER_HOST`` (or the local socket); raises ``BackendError`` when it does
        not answer.

        Each running job holds two streaming connections (wait and logs), so the
        connection pool is sized to the number of slots."""
        hardware = detect_hardware(cpu_cores=settings.cpu_cores, memory=settings.memory)
        logger.info(
            "host: %d core(s), %d MiB, %d GPU(s)",
            hardware.cpu_cores,
            hardware.memory,
            len(hardware.gpus),
        )
        try:
            client = docker.from_env(max_pool_size=4 * settings.slots + 4)
            client.ping()
        except DockerException as exc:
            raise BackendError(f"cannot reach the Docker engine: {exc}") from exc
        return cls(settings, client, hardware=hardware)

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
        self._exits.close()
        super().close()
        if self._client is not None:
            self._client.close()

    # -- placement -------------------------------------------------------------

    @property
    def job_root(self) -> Path:
        return self.settings.path_base

    @property
    def identity(self) -> str:
        # Runners in containers may share a PATH_BASE inside and use other folders
        # of the engine's host.
        return f"{self.settings.path_base}\0{self.settings.host_base}"

    @property
    def hardware(self) -> HostHardware:
        """The host's hardware the jobs are placed on."""
        return self._pool.hardware

    def host_path(self, folder: Path) -> Path:
        """``folder`` (under ``PATH_BASE``) as the Docker host sees it."""
        base, host_base = self.settings.path_base, self.settings.host_base
        if host_base == base:
            return folder
        if not folder.is_relative_to(base):
            raise BackendError(f"{folder} is not under PATH_BASE ({base})")
        return host_base / folder.relative_to(base)

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
            "volumes": {str(self.host_path(request.folder)): {"bind": MOUNT_POINT, "mode": "rw"}},
            "init": True,
            "network_mode": self.settings.container_network,
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
        }
        placement, container = request.placement, request.container
        if placement.memory is not None:
            options["mem_limit"] = f"{placement.memory}m"
            # Equal to the memory limit: no swap, so exceeding it is an OOM kill
            # rather than a crawl.
            options["memswap_limit"] = f"{placement.memory}m"
        if placement.cpus is not None:
            options["nano_cpus"] = self._nano_cpus(placement.cpus)
        if placement.gpu_ids:
            options["device_requests"] = [
                DeviceRequest(device_ids=list(placement.gpu_ids), capabilities=[["gpu"]])
            ]
        options["pids_limit"] = container.pids_limit or self.settings.container_pids_limit
        if container.user is not None:
            options["user"] = container.user
        if container.read_only_root:
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
            raise BackendError(f"could not create a container: {explain(exc)}") from exc
        logger.info("pulling image %s", request.image)
        try:
            self.client.images.pull(request.image)
        except DockerException as exc:
            raise ImageUnavailable(
                f"image {request.image} is not available locally and pulling it failed: "
                f"{explain(exc)}"
            ) from exc
        try:
            return self.client.containers.create(request.image, **options)
        except DockerException as exc:
            raise BackendError(f"could not create a container: {explain(exc)}") from exc

    def start(self, request: RunRequest) -> RunHandle:
        started_at = time.time()
        container = self._create(request)
        try:
            container.start()
        except DockerException as exc:
            self._force_remove(container.id or "")
            raise BackendError(f"could not start the container: {explain(exc)}") from exc
        self._exits.watch(container, started_at)
        return RunHandle(id=container.id or "", labels=dict(request.labels))

    # -- following a run -------------------------------------------------------

    def follow(self, handle: RunHandle) -> Future[RunResult]:
        exit_future = self._exits.future(handle.id)
        if exit_future is not None:
            return exit_future
        # A run this process did not start (a leftover): the engine is asked.
        return super().follow(handle)

    def poll(self, handles: Sequence[RunHandle]) -> dict[str, RunResult | BackendError]:
        ended: dict[str, RunResult | BackendError] = {}
        for handle in handles:
            try:
                state = self.client.api.inspect_container(handle.id).get("State", {})
            except NotFound:
                ended[handle.id] = BackendError(f"container {handle.id[:12]} is gone")
                continue
            except DockerException as exc:
                raise BackendError(f"could not inspect {handle.id[:12]}: {explain(exc)}") from exc
            if not state.get("Running"):
                ended[handle.id] = RunResult(
                    exit_code=int(state.get("ExitCode", -1)),
                    oom_killed=bool(state.get("OOMKilled")),
                )
        return ended

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
        self._exits.stopping(handle.id)
        try:
            self.client.containers.get(handle.id).stop(timeout=max(0, round(grace)))
        except NotFound:
            return
        except DockerException as exc:
            raise BackendError(f"could not stop {handle.id[:12]}: {explain(exc)}") from exc

    def _force_remove(self, container_id: str) -> None:
        try:
            self.client.api.remove_container(container_id, force=True, v=True)
        except NotFound:
            pass
        except APIError as exc:
            # Removal already in progress (a concurrent cleanup) is as good as done.
            if exc.status_code != 409:
                raise BackendError(f"could not remove {container_id[:12]}: {explain(exc)}") from exc

    def remove(self, handle: RunHandle) -> None:
        self._exits.stopping(handle.id)
        self._force_remove(handle.id)
        self._exits.forget(handle.id)

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
            raise BackendError(f"could not list containers: {explain(exc)}") from exc
        return [
            RunHandle(id=container.id or "", labels=dict(container.labels or {}))
            for container in containers
        ]
