"""The services of a local stack as child processes: started with ``python -m``,
watched, stopped in order."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import httpx

logger = logging.getLogger("labcloud")


class StartupError(Exception):
    """The stack cannot start; the message says why (``labcloud up`` exits with 1)."""


@dataclass
class Service:
    """A running service: its name in messages and log file, and its process."""

    name: str
    process: subprocess.Popen[bytes]


def start(
    name: str,
    module_args: list[str],
    env: dict[str, str],
    data_dir: Path,
    *,
    unset: tuple[str, ...] = (),
) -> Service:
    """``python -m <module_args>`` with ``env`` added and the variables ``unset``
    removed, logging to ``data_dir/logs/<name>.log``."""
    log_dir = data_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    log = (log_dir / f"{name}.log").open("ab")
    environment = {key: value for key, value in os.environ.items() if key not in unset}
    process = subprocess.Popen(  # noqa: S603 - our own interpreter and modules
        [sys.executable, "-m", *module_args],
        env={**environment, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=data_dir,
        # Own process group: Ctrl-C in the terminal reaches only `labcloud up`, which
        # then stops the services in order.
        start_new_session=True,
    )
    logger.info("started %s (pid %s, log %s)", name, process.pid, log.name)
    return Service(name, process)


def wait_ready(url: str, services: list[Service], timeout: float = 60) -> None:
    """Return once the API at ``url`` answers; raise ``StartupError`` when a service
    exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for service in services:
            if service.process.poll() is not None:
                raise StartupError(f"{service.name} exited; see its log in the data folder")
        try:
            if httpx.get(f"{url}/access_info", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise StartupError(f"{url} did not answer within {timeout:.0f} s")


def stop_all(services: list[Service]) -> None:
    """SIGTERM each service, last started first, and wait for it (40 s, then SIGKILL)."""
    # Runners first (they hand back their jobs), then the APIs.
    for service in reversed(services):
        if service.process.poll() is None:
            service.process.send_signal(signal.SIGTERM)
        try:
            service.process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            service.process.kill()
            service.process.wait()
        print(f"  {service.name} stopped")


def exec_module(module: str, args: list[str]) -> NoReturn:
    """Become ``python -m module args``: with the same process id, a signal sent to
    ``labcloud runner`` (SIGTERM from a service manager, Ctrl-C) reaches the runner
    itself; a child process would be left running, still pulling jobs."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", module, *args])  # noqa: S606
