"""Serving one ASGI application from several processes, each with its own socket.

uvicorn's ``--workers`` hands one listening socket to every process: the process
that wakes first accepts every connection waiting, so a client pool that opens its
keep-alive connections together lands on one process and leaves the others idle
(16 of 16 connections on one of two processes in the submission benchmark). Here
each process listens on its own socket bound with ``SO_REUSEPORT``; the kernel
spreads new connections over the sockets by a hash of their addresses, whichever
process is awake.

The supervisor binds every socket itself, so a port already in use stops the start
with one message, and keeps them open: a process that dies is started again on the
same socket, and the connections the kernel queued on it meanwhile are not lost.
The processes stop with the supervisor, even when it is killed with ``kill -9``;
SIGHUP replaces them one at a time, without refusing a connection.
Linux only, like ``SO_REUSEPORT``'s spreading of connections.
"""

from __future__ import annotations

import ctypes
import logging
import logging.config
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.importer import import_from_string

from labcloud.startup import one_line_startup_errors, wrap_factory

logger = logging.getLogger(__name__)

BACKLOG = 2048  # uvicorn's default
# How long a stopping server lets requests in flight finish. uvicorn's default is
# forever: a client sending its body slowly, or a long request, kept the server up
# after SIGTERM for as long as it liked.
GRACEFUL_SHUTDOWN_SECONDS = 5
STOP_TIMEOUT = 30.0
STARTUP_TIMEOUT = 120.0  # for a successor in a rolling restart
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class PortInUse(RuntimeError):
    """Another program listens on the address."""


def bind_shared(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` listening sockets on ``host:port`` in one ``SO_REUSEPORT`` group.

    Raises ``PortInUse`` when anything listens there already. Without the check a
    second server started by the same account would silently take half the
    connections of the first."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as probe:
        # Without SO_REUSEPORT the probe cannot join another server's group: its
        # bind fails whenever something listens on the address.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise PortInUse(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sockets = []
    for _ in range(count):
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        # Listening from the start queues the connections that arrive while the
        # processes start, instead of refusing them.
        sock.listen(BACKLOG)
        sock.set_inheritable(True)
        sockets.append(sock)
    return sockets


def _stop_with(parent: int) -> None:
    """Ask the kernel for SIGTERM when the supervisor dies, even by ``kill -9``:
    processes left behind would keep the port, and a new server could not start."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG): %s", os.strerror(ctypes.get_errno()))
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


class _Server(uvicorn.Server):
    """uvicorn's server, telling the supervisor once it serves."""

    def __init__(self, config: uvicorn.Config, ready: Event) -> None:
        super().__init__(config)
        self._ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._ready.set()


def _serve_one(
    app: str, sock: socket.socket, log_config: dict[str, Any], parent: int, ready: Event
) -> None:
    """A worker process: uvicorn serving ``app`` (a factory's import path) on ``sock``.

    A process that never started serving (the application did not import, or its
    startup failed: a database that refuses connections, say) exits with uvicorn's
    ``STARTUP_FAILURE``: starting it again would fail the same way, so the
    supervisor stops instead (or, in a reload, keeps the processes it has)."""
    config = uvicorn.Config(
        wrap_factory(import_from_string(app)),
        factory=True,
        log_config=log_config,
        backlog=BACKLOG,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    server = _Server(config, ready)
    _stop_with(parent)
    try:
        server.run(sockets=[sock])
    except SystemExit:
        if server.started:
            raise
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)
    _exit_now(0)


@dataclass
class _Slot:
    sock: socket.socket
    process: BaseProcess | None = None
    ready: Event | None = None
    started_at: float = 0.0


class Supervisor:
    """Runs one process per socket until told to stop; see the module's docstring."""

    def __init__(self, app: str, sockets: list[socket.socket], log_config: dict[str, Any]) -> None:
        self._app = app
        self._log_config = log_config
        self._slots = [_Slot(sock) for sock in sockets]
        self._context = multiprocessing.get_context("spawn")
        self._stopping = threading.Event()
        self._reload = threading.Event()
        self.exit_code = 0

    def _start(self, slot: _Slot) -> None:
        ready = self._context.Event()
        process = self._context.Process(
            target=_serve_one,
            args=(self._app, slot.sock, self._log_config, os.getpid(), ready),
        )
        process.start()
        slot.process, slot.ready, slot.started_at = process, ready, time.monotonic()

    def _handle_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            logger.info("received SIGHUP, replacing the server processes one at a time")
            self._reload.set()
            return
        logger.info("received %s, stopping the server processes", signal.Signals(signum).name)
        self._stopping.set()

    def _check(self, slot: _Slot) -> None:
        process = slot.process
        if process is None or process.is_alive():
            return
        if process.exitcode == STARTUP_FAILURE:
            logger.error("server process %s failed to start; stopping", process.pid)
            self.exit_code = 1
            self._stopping.set()
            return
        logger.warning(
            "server process %s exited with status %s after %.0f s; starting another",
            process.pid,
            process.exitcode,
            time.monotonic() - slot.started_at,
        )
        self._start(slot)

    def _replace_all(self) -> None:
        """A rolling restart (SIGHUP): each process in turn gets a successor on its
        socket, and leaves once the successor serves. Connections keep being
        accepted throughout, and new settings or code take effect without downtime.
        A successor that cannot start is given up and the old processes stay."""
        for slot in self._slots:
            old = (slot.process, slot.ready, slot.started_at)
            self._start(slot)
            if not self._wait_ready(slot):
                failed = slot.process
                assert failed is not None
                logger.error(
                    "a new server process did not start (status %s); keeping the old ones",
                    failed.exitcode,
                )
                _stop([failed])
                slot.process, slot.ready, slot.started_at = old
                return
            if old[0] is not None:
                _stop([old[0]])
        logger.info("all server processes replaced")

    def _wait_ready(self, slot: _Slot) -> bool:
        assert slot.process is not None and slot.ready is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline and not self._stopping.is_set():
            if slot.ready.wait(0.1):
                return True
            if not slot.process.is_alive():
                return False
        return False

    def run(self, poll_interval: float = 0.5) -> int:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._handle_signal)
        for slot in self._slots:
            self._start(slot)
        while not self._stopping.wait(poll_interval):
            if self._reload.is_set():
                self._reload.clear()
                self._replace_all()
            for slot in self._slots:
                self._check(slot)
        _stop([slot.process for slot in self._slots if slot.process is not None])
        for slot in self._slots:
            slot.sock.close()
        return self.exit_code


def _exit_now(code: int) -> None:
    """End the process once the server stopped, without waiting for threads.

    A request cut off by the graceful timeout may still run in a worker thread (a
    sync endpoint: validation, a storage call); the interpreter would wait for it at
    exit. Its transaction was never committed, and the database drops it with the
    connection."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve_one_process(app: Any, *, host: str, port: int, log_config: dict[str, Any]) -> int:
    """Serve ``app`` from this process until SIGINT/SIGTERM, then stop within about
    ``GRACEFUL_SHUTDOWN_SECONDS`` whatever its requests are doing."""
    config = uvicorn.Config(
        one_line_startup_errors(app),
        host=host,
        port=port,
        log_config=log_config,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    server = uvicorn.Server(config)
    server.run()
    code = 0 if server.started else STARTUP_FAILURE
    _exit_now(code)
    return code  # not reached; for the type checker and readers


def _stop(processes: list[BaseProcess]) -> None:
    """SIGTERM (uvicorn finishes the requests in flight), then SIGKILL for those
    still there after ``STOP_TIMEOUT``."""
    running = [process for process in processes if process.is_alive()]
    for process in running:
        process.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT
    for process in running:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            logger.warning("server process %s did not stop in time; killing it", process.pid)
            process.kill()
            process.join()


def serve_processes(
    app: str, *, host: str, port: int, workers: int, log_config: dict[str, Any]
) -> int:
    """Serve the application factory at ``app`` from ``workers`` processes; returns
    the exit status (0 after SIGINT/SIGTERM, 1 when a process failed to start)."""
    logging.config.dictConfig(log_config)
    sockets = bind_shared(host, port, workers)
    logger.info("serving %s on http://%s:%s from %d processes", app, host, port, workers)
    return Supervisor(app, sockets, log_config).run()
