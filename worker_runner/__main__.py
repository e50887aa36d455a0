"""``python -m worker_runner [--env-file PATH]``: run the worker on this host.

Builds the execution backend that ``BACKEND`` names from its settings, then runs
the dispatcher (``worker_runner.dispatcher.Runner``). SIGTERM or SIGINT stops
pulling and lets running jobs finish for up to ``SHUTDOWN_GRACE`` seconds before
they are stopped and handed back; a second signal ends the grace at once. Exit
status: 0 after a clean stop, 2 on invalid settings, 1 when the backend cannot
start (the Docker engine cannot be reached), the credentials are refused, or a
runner with the same account and ``PATH_BASE`` already runs on this host.
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

from worker_runner.backends.base import BackendError, BackendSettings
from worker_runner.backends.registry import create_backend, load_backend_settings
from worker_runner.client import AuthenticationFailed, WorkerApiClient, WorkerApiError
from worker_runner.dispatcher import Runner, RunnerAlreadyRunning
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


def run_worker(settings: WorkerSettings, backend_settings: BackendSettings) -> int:
    """Run the worker with ``settings`` on the backend of ``backend_settings``
    until a signal stops it."""
    try:
        backend = create_backend(settings.backend, backend_settings)
    except BackendError as exc:
        logger.error("%s", exc.message)
        return 1
    client = WorkerApiClient(
        api_url=settings.api_url,
        auth_url=settings.auth_url,
        username=settings.username,
        password=settings.password,
        cognito_secret=settings.cognito_secret,
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
    runner = Runner(settings, client, backend)
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
        backend_settings = load_backend_settings(settings.backend, args.env_file)
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(describe_validation_error(exc), file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    return run_worker(settings, backend_settings)


if __name__ == "__main__":
    sys.exit(main())
