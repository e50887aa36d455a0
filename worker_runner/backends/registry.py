"""Which execution backend a runner uses: the ``BACKEND`` setting names one.

Each name maps to its module's backend class and settings class. Adding a backend
means one module with an ``ExecutionBackend`` subclass, a ``BackendSettings``
subclass and a ``from_settings`` class method, then one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from worker_runner.backends.aws_batch import BatchBackend, BatchSettings
from worker_runner.backends.base import BackendSettings, ExecutionBackend
from worker_runner.backends.docker import DockerBackend, DockerSettings
from worker_runner.backends.fake import FakeBackend, FakeSettings


class BackendKind(StrEnum):
    """The values of ``BACKEND``."""

    DOCKER = "docker"
    AWS_BATCH = "aws-batch"
    FAKE = "fake"


@dataclass(frozen=True, slots=True)
class BackendEntry:
    """A backend's settings class and how to build it from them."""

    settings: type[BackendSettings]
    # Raises ``BackendError`` when the backend cannot start (its engine is away).
    build: Callable[[Any], ExecutionBackend]


BACKENDS: dict[BackendKind, BackendEntry] = {
    BackendKind.DOCKER: BackendEntry(DockerSettings, DockerBackend.from_settings),
    BackendKind.AWS_BATCH: BackendEntry(BatchSettings, BatchBackend.from_settings),
    BackendKind.FAKE: BackendEntry(FakeSettings, FakeBackend.from_settings),
}


def load_backend_settings(kind: BackendKind, env_file: Path | None = None) -> BackendSettings:
    """The settings of backend ``kind`` from the environment and ``env_file``
    (default ``.env``); raises ``pydantic.ValidationError`` naming a bad one."""
    entry = BACKENDS[kind]
    if env_file is None:
        return entry.settings()
    return entry.settings(_env_file=env_file)


def create_backend(kind: BackendKind, settings: BackendSettings) -> ExecutionBackend:
    """Build backend ``kind`` from its settings (as ``load_backend_settings``
    read them)."""
    entry = BACKENDS[kind]
    if not isinstance(settings, entry.settings):
        raise TypeError(f"the {kind} backend takes {entry.settings.__name__}")
    return entry.build(settings)
