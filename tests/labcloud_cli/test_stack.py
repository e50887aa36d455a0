"""The ``labcloud`` command as a newcomer runs it: the installed console script in
real processes, on real ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from labcloud.auth.passwords import generate_password, password_problem
from labcloud_cli.stack import setup
from tests.e2e.stack import free_port
from tests.waiting import wait_for
from worker_runner.settings import load_settings

# The console script poetry installs beside the interpreter: what `labcloud` runs.
LABCLOUD = Path(sys.executable).parent / "labcloud"
BYTECODE_CACHE = Path(tempfile.gettempdir()) / "labcloud-pycache"


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(BYTECODE_CACHE)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _other_address() -> str:
    """An address of this machine other than 127.0.0.1, as another host would use:
    the interface of the default route (no packet is sent); on a machine without
    one, 127.0.0.2, which a server listening on 127.0.0.1 alone does not answer
    either."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("198.51.100.1", 9))  # TEST-NET-2: only the route is looked up
        except OSError:
            return "127.0.0.2"
        address: str = probe.getsockname()[0]
    return address if address != "127.0.0.1" else "127.0.0.2"


# -- generated passwords (item: a first start failed about once in 140) --------------


def test_generated_passwords_always_pass_the_rule(tmp_path: Path) -> None:
    # token_urlsafe(18) is all letters once in ~150 draws: 3,000 starts of the old
    # code contained one with near certainty (1 - (149/150)^3000 > 0.999999999).
    for index in range(3000):
        secrets = setup.persistent_secrets(tmp_path / str(index))
        assert password_problem(secrets["admin_password"]) is None, secrets["admin_password"]
    assert all(password_problem(generate_password()) is None for _ in range(3000))
    assert len(generate_password()) == 24
    with pytest.raises(ValueError, match="at least 8"):
        generate_password(4)


def test_a_refused_admin_password_left_by_a_failed_start_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "admin_password").write_text("onlyLettersFromAnEarlierStart\n")
    (tmp_path / "internal_api_key").write_text("kept-as-it-is\n")
    secrets = setup.persistent_secrets(tmp_path)
    assert password_problem(secrets["admin_password"]) is None
    assert (tmp_path / "admin_password").read_text() == secrets["admin_password"]
    assert secrets["internal_api_key"] == "kept-as-it-is"
    # A good one is never replaced: the admin account was created with it.
    assert setup.persistent_secrets(tmp_path)["admin_password"] == secrets["admin_password"]


# -- ports already taken --------------------------------------------------------------


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something listens on (and never answers)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def _up(data_dir: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LABCLOUD), "up", "--data-dir", str(data_dir), "--skip-demo-image", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        check=False,
    )


@pytest.mark.parametrize("option", ["--user-port", "--worker-port"])
def test_up_names_a_port_in_use_and_starts_nothing(
    tmp_path: Path, taken_port: int, option: str
) -> None:
    other = "--worker-port" if option == "--user-port" else "--user-port"
    began = time.monotonic()
    result = _up(tmp_path / "data", option, str(taken_port), other, str(free_port()))
    assert result.returncode == 1, result
    assert f"port {taken_port} on 127.0.0.1 is not free" in result.stderr
    assert option in result.stderr
    # Refused before anything was started or written.
    assert not (tmp_path / "data").exists()
    assert time.monotonic() - began < 30


def test_up_refuses_one_port_for_both_apis(tmp_path: Path) -> None:
    port = str(free_port())
    result = _up(tmp_path / "data", "--user-port", port, "--worker-port", port)
    assert result.returncode == 1
    assert "the ports must differ" in result.stderr


# -- the address other machines use --------------------------------------------------


def test_advertised_address_makes_worker_env_usable_from_another_machine(
    tmp_path: Path,
) -> None:
    address = _other_address()
    user_port, worker_port = free_port(), free_port()
    data_dir = tmp_path / "data"
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [
            str(LABCLOUD),
            "up",
            "--data-dir",
            str(data_dir),
            "--skip-demo-image",
            "--runners",
            "0",
            "--user-port",
            str(user_port),
            "--worker-port",
            str(worker_port),
            "--advertise-address",
            address,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_env(),
    )
    try:
        output = tmp_path / "up.log"
        wait_for(
            lambda: b"LabCloud is up" in output.read_bytes() or up.poll() is not None,
            timeout=120,
            interval=0.2,
            what="labcloud up to start",
        )
        assert up.poll() is None, output.read_text()
        settings = load_settings(data_dir / "worker.env")
        assert settings.api_url == f"http://{address}:{worker_port}"
        assert settings.auth_url == f"http://{address}:{user_port}"
        assert f"http://{address}:{user_port}" in output.read_text()
        # What a runner on another host does with the file: log in, then pull.
        token = httpx.post(
            f"{settings.auth_url}/token",
            data={"username": settings.username, "password": settings.password.get_secret_value()},
            timeout=30,
        )
        assert token.status_code == 201, token.text
        assert password_problem(settings.password.get_secret_value()) is None
        pulled = httpx.get(
            f"{settings.api_url}/jobs",
            params={"memory": 1024, "cpu_cores": 1, "limit": 1},
            headers={"Authorization": f"Bearer {token.json()['id_token']}"},
            timeout=30,
        )
        assert pulled.status_code == 200, pulled.text
        assert pulled.json() == {}  # no job for it, in the upstream shape
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=60)
        finally:
            if up.poll() is None:
                up.kill()
            log.close()


def test_without_an_advertised_address_everything_stays_on_loopback(tmp_path: Path) -> None:
    # The default keeps the stack private to this machine; the probe names the
    # loopback address it checked.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = _up(tmp_path / "d", "--user-port", str(port), "--worker-port", str(free_port()))
    assert "on 127.0.0.1 is not free" in result.stderr


# -- signals reach the runner ---------------------------------------------------------


def _descendants(pid: int) -> set[int]:
    children: dict[int, set[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The parent's pid is the second field after the parenthesised name.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, set()).add(int(entry.name))
    found: set[int] = set()
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), set()):
            if child not in found:
                found.add(child)
                pending.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its exit status is left


@pytest.mark.docker
def test_sigterm_to_labcloud_runner_stops_the_runner(tmp_path: Path) -> None:
    env_file = tmp_path / "worker.env"
    closed = free_port()  # nothing listens: the runner keeps trying, as during an outage
    env_file.write_text(
        f"API_URL=http://127.0.0.1:{closed}\n"
        f"AUTH_URL=http://127.0.0.1:{closed}\n"
        "USERNAME=runner@example.org\n"
        "PASSWORD=correct-horse-1\n"
        f"PATH_BASE={tmp_path / 'jobs'}\n"
    )
    log_path = tmp_path / "runner.log"
    with log_path.open("wb") as log:
        runner = subprocess.Popen(
            [str(LABCLOUD), "runner", "--env-file", str(env_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
    tree = {runner.pid}
    try:
        wait_for(
            lambda: " started: up to " in log_path.read_text(errors="replace"),
            timeout=120,
            interval=0.2,
            what="the runner to start and find no API",
        )
        tree |= _descendants(runner.pid)
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=60)
        wait_for(
            lambda: not any(_alive(pid) for pid in tree),
            timeout=60,
            what=f"every process of `labcloud runner` ({sorted(tree)}) to end",
        )
        # It stopped as a runner stops on SIGTERM, not killed half-way.
        assert "signal 15: no new jobs" in log_path.read_text(errors="replace")
        assert runner.returncode == 0
    finally:
        # An orphaned child is no longer a descendant: kill what was seen.
        for pid in tree | _descendants(runner.pid):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if runner.poll() is None:
            runner.kill()
            runner.wait()
