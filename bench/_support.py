"""What the benchmarks share: the repository on ``sys.path`` (they run as ``python
bench/<name>.py``), a complete stack of real processes on loopback on SQLite or a
throwaway PostgreSQL database, trivial jobs, percentiles.

Everything talks to 127.0.0.1 only; every process, container and database a
benchmark starts is stopped or dropped when it ends."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import docker  # noqa: E402

from labcloud.contract import HardwareSpec  # noqa: E402
from labcloud_cli.images import DEMO_IMAGE, ensure_demo_image  # noqa: E402
from tests.databases import temporary_postgres_database  # noqa: E402
from tests.e2e.stack import Stack  # noqa: E402
from tests.waiting import wait_for  # noqa: E402
from worker_runner.backends.docker import DockerSettings  # noqa: E402
from worker_runner.hardware import ResourcePool, detect_hardware  # noqa: E402

POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
CATALOG = REPO_ROOT / "tests" / "data" / "application_config.yaml"
BACKENDS = ("postgresql", "sqlite")
# What a runner uses when nothing is configured (worker_runner.settings): the
# benchmarks measure the defaults, not the test suite's short intervals.
RUNNER_DEFAULTS = {"TIMEOUT_STATUS": "5", "TIMEOUT_JOB": "10", "WAIT": "5"}
# Per-user limit of active jobs, raised so that a benchmark measures the queue and
# not the fair-use rule.
NO_JOB_LIMIT = {"DEFAULT_MAX_ACTIVE_JOBS": "100000000"}

__all__ = [
    "BACKENDS",
    "DEMO_IMAGE",
    "NO_JOB_LIMIT",
    "POSTGRES_ADMIN_URL",
    "RUNNER_DEFAULTS",
    "Stack",
    "database_urls",
    "ensure_image",
    "job_container_run",
    "job_payload",
    "machine_speed",
    "percentile",
    "running_stack",
    "summary",
    "wait_for",
]


def ensure_image() -> str:
    engine = docker.from_env()
    try:
        return ensure_demo_image(engine)
    finally:
        engine.close()


def job_container_run(image: str, command: str, folder: Path, *, slots: int = 1) -> list[str]:
    """A ``docker run --rm`` command line that gives a container what a runner with
    default settings and ``slots`` gives a job that names no hardware: ``init``,
    no network, all capabilities dropped, ``no-new-privileges``, its share of the
    host's memory (no swap) and cores, the PIDs limit, the job folder at ``/files``.

    A baseline without these would flatter the platform: on the default bridge
    network a container costs about 73 ms more to start here than with none."""
    defaults = DockerSettings.model_fields
    reservation = ResourcePool(detect_hardware(), slots).reserve(HardwareSpec())
    assert reservation is not None, "an idle pool always reserves"
    memory = f"{reservation.memory}m"
    cpus = min(reservation.cpus, float(os.cpu_count() or 1))
    return [
        "docker",
        "run",
        "--rm",
        "--init",
        "--network",
        str(defaults["container_network"].default),
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--memory",
        memory,
        "--memory-swap",
        memory,
        "--cpus",
        f"{cpus:g}",
        "--pids-limit",
        str(defaults["container_pids_limit"].default),
        "--volume",
        f"{folder}:/files:rw",
        image,
        "/bin/sh",
        "-c",
        command,
    ]


def machine_speed() -> float:
    """Seconds this machine needs for a fixed pure-Python loop (best of three).

    The shared machines' speed varies by more than half from one day to the next;
    printed beside a result, it tells a slower machine from a slower program."""
    best = float("inf")
    for _ in range(3):
        began = time.perf_counter()
        total = 0
        for number in range(5_000_000):
            total += number * number
        best = min(best, time.perf_counter() - began)
    return best


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(label: str, values_ms: Sequence[float], width: int = 50) -> str:
    """One line: count, p50, p95, mean, min and max in milliseconds."""
    return (
        f"{label:<{width}} n={len(values_ms):<5} p50={percentile(values_ms, 50):8.1f} ms  "
        f"p95={percentile(values_ms, 95):8.1f} ms  mean={statistics.fmean(values_ms):8.1f} ms  "
        f"min={min(values_ms):7.1f}  max={max(values_ms):7.1f}"
    )


def job_payload(name: str, entrypoint: str = "noop", **env: str) -> dict[str, Any]:
    return {
        "job_name": name,
        "application": {"application": "testing", "version": "1.0", "entrypoint": entrypoint},
        "attributes": {"env_vars": env} if env else {},
    }


@contextlib.contextmanager
def database_urls(backend: str, *names: str) -> Iterator[dict[str, str]]:
    """One throwaway PostgreSQL database per name (dropped afterwards), or nothing
    for SQLite (the stack then makes its own files)."""
    with contextlib.ExitStack() as resources:
        urls: dict[str, str] = {}
        if backend == "postgresql":
            for name in names:
                urls[name] = resources.enter_context(
                    temporary_postgres_database(POSTGRES_ADMIN_URL)
                )
        yield urls


@contextlib.contextmanager
def running_stack(
    backend: str,
    *,
    runners: int = 0,
    user_env: Mapping[str, str] | None = None,
    worker_env: Mapping[str, str] | None = None,
    runner_env: Mapping[str, str] | None = None,
) -> Iterator[Stack]:
    """A started stack on ``backend`` in a temporary folder; its logs' tails are
    printed when the block fails."""
    with (
        tempfile.TemporaryDirectory(prefix="labcloud-bench-") as folder,
        database_urls(backend, "user_db", "queue_db") as urls,
    ):
        stack = Stack(Path(folder), CATALOG, **urls)
        stack.user_api.env.update(user_env or {})
        stack.worker_api.env.update(worker_env or {})
        stack.runner_env.update(runner_env or {})
        try:
            stack.start(runners=runners)
            yield stack
        except BaseException:
            print(stack.logs(), file=sys.stderr)
            raise
        finally:
            stack.stop()
