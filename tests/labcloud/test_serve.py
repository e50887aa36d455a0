"""The multi-process server (``labcloud.serve``) as real processes on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from labcloud.serve import PortInUse, bind_shared
from tests.e2e.stack import REPO_ROOT, free_port
from tests.waiting import wait_for


class Served:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process, self.url, self.log = process, f"http://127.0.0.1:{port}", log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def pid(self) -> int | None:
        try:
            return int(httpx.get(f"{self.url}/pid", timeout=60).json())
        except httpx.TransportError:
            return None


def start(tmp_path: Path, workers: int, **env: str) -> Served:
    port = free_port()
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.labcloud.serve_app", str(port), str(workers)],
            cwd=REPO_ROOT,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Served(process, port, log)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    server = start(tmp_path, workers=2, SERVE_APP_FAIL_IF=str(tmp_path / "fail"))
    try:
        wait_for(lambda: server.output().count("Application startup complete") == 2, 60)
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def pids_of_connections_opened_together(url: str, count: int) -> set[int]:
    """The processes that served ``count`` keep-alive connections opened at once.

    Deadlines are generous: on a loaded 2-core machine 16 requests to processes
    that have just started can take seconds; they bound only a failing test."""
    clients = [httpx.Client(base_url=url, timeout=60) for _ in range(count)]
    barrier = threading.Barrier(count)
    pids: list[int] = []

    def ask(client: httpx.Client) -> None:
        barrier.wait()
        pids.append(int(client.get("/pid").json()))

    threads = [threading.Thread(target=ask, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for client in clients:
        client.close()
    assert len(pids) == count
    return set(pids)


def test_connections_opened_together_are_spread_over_the_processes(served: Served) -> None:
    # uvicorn's shared socket gives a burst of connections to the first process
    # that wakes; one socket per process lets the kernel spread them (all 16 on one
    # of two sockets has a chance of 1 in 32,768).
    assert len(pids_of_connections_opened_together(served.url, 16)) == 2


def test_a_process_that_dies_is_started_again(served: Served) -> None:
    victim = next(iter(pids_of_connections_opened_together(served.url, 16)))
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: "starting another" in served.output(), 60, what="the restart")
    wait_for(lambda: served.output().count("Application startup complete") == 3, 60)
    pids = pids_of_connections_opened_together(served.url, 16)
    assert victim not in pids
    assert len(pids) == 2


class Hammer:
    """Requests on new connections, back to back in a thread, counting failures."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                httpx.get(f"{self.url}/pid", timeout=60).raise_for_status()
                self.answers += 1
            except httpx.HTTPError as exc:
                self.failures.append(repr(exc))

    def __enter__(self) -> Hammer:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(120)


def test_sighup_replaces_the_processes_without_refusing_a_request(served: Served) -> None:
    before = pids_of_connections_opened_together(served.url, 16)
    with Hammer(served.url) as hammer:
        served.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "all server processes replaced" in served.output(), 60)
    after = pids_of_connections_opened_together(served.url, 16)
    assert len(after) == 2
    assert before.isdisjoint(after)
    assert not any(running(pid) for pid in before)
    assert hammer.answers > 0
    assert hammer.failures == []
    assert served.process.poll() is None


def test_a_reload_that_cannot_start_keeps_the_old_processes(served: Served, tmp_path: Path) -> None:
    before = pids_of_connections_opened_together(served.url, 16)
    (tmp_path / "fail").touch()  # the new processes' startup fails from now on
    served.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "keeping the old ones" in served.output(), 60)
    assert pids_of_connections_opened_together(served.url, 16) == before
    assert served.process.poll() is None
    (tmp_path / "fail").unlink()
    served.process.send_signal(signal.SIGHUP)  # a later reload goes through
    wait_for(lambda: "all server processes replaced" in served.output(), 60)
    assert pids_of_connections_opened_together(served.url, 16).isdisjoint(before)


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie whose parent is gone does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_sigterm_stops_every_process(served: Served) -> None:
    workers = pids_of_connections_opened_together(served.url, 16)
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=60) == 0
    assert not any(running(pid) for pid in workers)
    assert "received SIGTERM" in served.output()


def test_the_processes_stop_when_the_supervisor_is_killed(served: Served, tmp_path: Path) -> None:
    workers = pids_of_connections_opened_together(served.url, 16)
    served.process.kill()
    served.process.wait()
    wait_for(lambda: not any(running(pid) for pid in workers), 60, what="the workers to stop")
    # The port is free again: a new server starts on it.
    port = int(served.url.rsplit(":", 1)[1])
    for sock in bind_shared("127.0.0.1", port, 2):
        sock.close()


def test_a_startup_failure_stops_the_server(tmp_path: Path) -> None:
    (tmp_path / "fail").touch()
    server = start(tmp_path, workers=2, SERVE_APP_FAIL_IF=str(tmp_path / "fail"))
    try:
        assert server.process.wait(timeout=60) == 1
    finally:
        if server.process.poll() is None:
            server.process.kill()
    assert "failed to start; stopping" in server.output()
    assert "startup failed on purpose" in server.output()


def test_a_port_in_use_is_refused() -> None:
    with socket.socket() as plain:
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        with pytest.raises(PortInUse, match=r"cannot listen on 127\.0\.0\.1:"):
            bind_shared("127.0.0.1", plain.getsockname()[1], 2)


def test_a_port_another_server_shares_is_refused() -> None:
    # Without the check, a second server of the same account would join the first
    # one's group and take half its connections.
    port = free_port()
    first = bind_shared("127.0.0.1", port, 2)
    try:
        with pytest.raises(PortInUse):
            bind_shared("127.0.0.1", port, 2)
    finally:
        for sock in first:
            sock.close()
