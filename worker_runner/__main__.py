"""``python -m worker_runner [--env-file PATH]``: run the worker on this host.

SIGTERM or SIGINT stops pulling and lets running jobs finish for up to
``SHUTDOWN_GRACE`` seconds before they are stopped and handed back; a second signal
ends the grace at once. Exit status: 0 after a clean stop, 2 on invalid settings,
1 when the Docker engine cannot be reached, the credentials are refused, or a runner
with the same account and ``PATH_BASE`` already runs on this host.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from pydantic import ValidationError

from worker_runner.backends.base import BackendError
from worker_runner.backends.docker import DockerBackend
from worker_runner.client import AuthenticationFailed, WorkerApiClient, WorkerApiError
from worker_runner.hardware import detect_hardware
from worker_runner.loop import Runner, RunnerAlreadyRunning
from worker_runner.settings import WorkerSettings, describe_validation_error, load_settings

logger = logging.getLogger("worker_runner")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m worker_runner",
        description="Pull LabCloud jobs from the worker API and run them in containers.",
    )
    parser.add_argument(
        "--env-file",
        type=Path,
        default=None,
        help="file of settings (KEY=value lines); default: .env in the working directory",
    )
    return parser.parse_args(argv)


def configure_logging(level: str) -> None:
    """Log to stderr with timestamps and thread names (one thread per running job)."""
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s [%(threadName)s] %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def _install_signal_handlers(stop: threading.Event, runner: Runner) -> None:
    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            logger.warning("signal %d again: stopping running jobs now", signum)
            runner.hurry()
        else:
            logger.info("signal %d: no new jobs; finishing running ones", signum)
            stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


def run_worker(settings: WorkerSettings) -> int:
    """Run the worker with ``settings`` until a signal stops it."""
    hardware = detect_hardware(cpu_cores=settings.cpu_cores, memory=settings.memory)
    logger.info(
        "host: %d core(s), %d MiB, %d GPU(s)",
        hardware.cpu_cores,
        hardware.memory,
        len(hardware.gpus),
    )
    try:
        # Each running job streams two connections (wait and logs).
        backend = DockerBackend.from_env(max_pool_size=4 * settings.slots + 4)
    except BackendError as exc:
        logger.error("%s", exc.message)
        return 1
    client = WorkerApiClient(
        api_url=settings.api_url,
        auth_url=settings.auth_url,
        username=settings.username,
        password=settings.password,
    )
    try:
        client.authenticate()
    except AuthenticationFailed as exc:
        logger.error("%s", exc.message)
        client.close()
        backend.close()
        return 1
    except WorkerApiError as exc:
        # The API may come up later; the loop keeps trying.
        logger.warning("cannot reach the API yet: %s", exc.message)
    stop = threading.Event()
    runner = Runner(settings, client, backend, hardware)
    _install_signal_handlers(stop, runner)
    try:
        runner.run(stop)
    except RunnerAlreadyRunning as exc:
        logger.error("%s", exc.message)
        return 1
    finally:
        client.close()
        backend.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m worker_runner``; returns the exit status."""
    args = _parse_args(argv)
    try:
        settings = load_settings(args.env_file)
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(describe_validation_error(exc), file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    return run_worker(settings)


if __name__ == "__main__":
    sys.exit(main())
