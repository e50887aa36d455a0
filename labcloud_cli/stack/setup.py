"""What a local stack keeps in its data folder and checks before it starts: secrets
made once, free ports, and one ``workers`` account with a settings file per runner."""

from __future__ import annotations

import secrets
import shlex
import socket
from collections.abc import Callable
from pathlib import Path

import httpx

from labcloud.auth.local import generate_private_key_pem
from labcloud.auth.passwords import generate_password, password_problem
from labcloud.contract import Group
from labcloud_cli.stack.processes import StartupError

ADMIN_ACCOUNT = "admin@labcloud.example.org"
WILDCARDS = ("0.0.0.0", "::", "")  # noqa: S104 - names of "every interface", not a bind


def persistent_secrets(data_dir: Path) -> dict[str, str]:
    """Secrets generated once per data folder, so tokens and accounts survive a
    restart of the stack. Files are readable by their owner only."""
    data_dir.mkdir(parents=True, exist_ok=True)
    values: dict[str, str] = {}
    makers: tuple[tuple[str, Callable[[], str]], ...] = (
        ("internal_api_key", lambda: secrets.token_urlsafe(32)),
        ("local_auth_key.pem", generate_private_key_pem),
        ("admin_password", generate_password),
    )
    for name, make in makers:
        path = data_dir / name
        # An admin password the rule refuses was left by a start that failed on it
        # (no account can have it): replace it rather than fail every start after.
        stale = name == "admin_password" and path.exists() and _refused(path.read_text())
        if stale or not path.exists():
            path.touch(mode=0o600)
            path.write_text(make())
        values[name] = path.read_text().strip()
    return values


def _refused(password: str) -> bool:
    return password_problem(password.strip()) is not None


def url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def free_port(host: str) -> int:
    """A port nothing listens on at ``host`` now (the system's choice)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as probe:
        probe.bind(address)
        port: int = probe.getsockname()[1]
        return port


def port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on, or None.

    Probed by binding as uvicorn will (``SO_REUSEADDR``, which lets a port in
    TIME_WAIT be reused but not one that something listens on). Without the check a
    server already on the port answers ``labcloud up``'s own requests, and the start
    fails later with a misleading message."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def check_ports(host: str, ports: dict[str, int]) -> None:
    """Raise ``StartupError`` naming the option of a port that is taken (``ports``
    maps each option to its port)."""
    if len(set(ports.values())) < len(ports):
        raise StartupError(f"the ports must differ: {ports}")
    for option, port in ports.items():
        problem = port_problem(host, port)
        if problem is not None:
            raise StartupError(
                f"port {port} on {host} is not free ({problem}): another program "
                f"listens there; stop it or choose another port with {option}"
            )


def admin_headers(user_url: str, admin_password: str) -> dict[str, str]:
    """Headers that make a request as the stack's admin account."""
    token = httpx.post(
        f"{user_url}/token",
        data={"username": ADMIN_ACCOUNT, "password": admin_password},
        timeout=30,
    )
    if token.status_code != 201:
        raise StartupError(f"cannot log in as {ADMIN_ACCOUNT}: {token.text}")
    return {"Authorization": f"Bearer {token.json()['id_token']}"}


# Makes a ``workers`` account (email, password) unless it exists.
CreateWorkerAccount = Callable[[str, str], None]


def worker_account_via_api(via: str, admin: dict[str, str]) -> CreateWorkerAccount:
    """Worker accounts made by the stack's admin through the user API at ``via``."""

    def create(account: str, password: str) -> None:
        created = httpx.post(
            f"{via}/user",
            data={"username": account, "password": password, "groups": [Group.WORKERS.value]},
            headers=admin,
            timeout=30,
        )
        if created.status_code not in (201, 409):
            raise StartupError(f"cannot create the worker account {account}: {created.text}")

    return create


def worker_env(
    folder: Path,
    name: str,
    user_url: str,
    worker_url: str,
    jobs: Path,
    *,
    create_account: CreateWorkerAccount,
    extra: dict[str, str] | None = None,
) -> Path:
    """Write ``folder/<name>.env`` for a runner with its own ``workers`` account,
    made by ``create_account`` the first time (the password is kept in the file).
    ``user_url`` and ``worker_url`` are what the runner will use; ``extra`` are
    more lines of the file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.env"
    account = f"{name}@labcloud.example.org"
    values = read_env_file(path)
    password = values.get("PASSWORD", "")
    if password_problem(password) is not None:
        password = generate_password()
    create_account(account, password)
    lines = {
        "API_URL": worker_url,
        "AUTH_URL": user_url,
        "USERNAME": account,
        "PASSWORD": password,
        "PATH_BASE": str(jobs),
        "PATH_HOST_BASE": str(jobs),
        # Keep-alives every 2 s: a cancelled job's container stops within seconds.
        "TIMEOUT_STATUS": "2",
        **(extra or {}),
    }
    path.touch(mode=0o600)
    path.write_text(
        "# Settings of one LabCloud worker runner (one account per runner); start it with\n"
        f"#   labcloud runner --env-file {path}\n"
        + "".join(f"{key}={shlex.quote(value)}\n" for key, value in lines.items())
    )
    return path


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines of a settings file (values shell-quoted); {} when it is missing."""
    if not path.exists():
        return {}
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.startswith("#"):
            values[key.strip()] = (shlex.split(value) or [""])[0]
    return values
