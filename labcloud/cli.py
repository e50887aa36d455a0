"""The ``labcloud`` command: ``up`` starts a complete local stack, ``runner`` adds a
worker runner, ``demo-image`` builds the demo tool's image, ``admin`` administers a
running user API (``labcloud.admin_cli``)."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import httpx

from labcloud import admin_cli
from labcloud.auth.local import generate_private_key_pem
from labcloud.auth.passwords import generate_password, password_problem

logger = logging.getLogger("labcloud")
REPO_ROOT = Path(__file__).resolve().parents[1]
ADMIN_ACCOUNT = "admin@labcloud.example.org"


@dataclass
class _Service:
    name: str
    process: subprocess.Popen[bytes]


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["admin"]:
        # Its own parser, options and exit codes: hand over everything after "admin".
        return admin_cli.main(arguments[1:])
    parser = argparse.ArgumentParser(prog="labcloud", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start the user API, the worker API and runners")
    up.add_argument("--data-dir", type=Path, default=Path(".labcloud"))
    up.add_argument(
        "--host",
        default=None,
        help="address the APIs listen on (default 127.0.0.1; 0.0.0.0 with --advertise-address)",
    )
    up.add_argument(
        "--advertise-address",
        default=None,
        metavar="HOST",
        help="name or IP address of this machine that other machines (runners on GPU "
        "hosts) reach it at; used in worker.env and in the APIs' public URLs",
    )
    up.add_argument("--user-port", type=int, default=8000)
    up.add_argument("--worker-port", type=int, default=8001)
    up.add_argument("--runners", type=int, default=1, help="number of runner processes")
    up.add_argument(
        "--catalog",
        type=Path,
        default=REPO_ROOT / "application_config.yaml",
        help="the application catalog (edits take effect without a restart)",
    )
    up.add_argument("--skip-demo-image", action="store_true", help="do not build the demo image")

    runner = commands.add_parser("runner", help="run a worker runner")
    runner.add_argument("--env-file", type=Path, required=True, help="e.g. DIR/worker.env")

    image = commands.add_parser("demo-image", help="build the demo tool's Docker image")
    image.add_argument("--rebuild", action="store_true")

    commands.add_parser(
        "admin", help="administer a running user API (see: labcloud admin --help)", add_help=False
    )

    args = parser.parse_args(arguments)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.command == "up":
        return _up(args)
    if args.command == "runner":
        _exec_module("worker_runner", ["--env-file", str(args.env_file)])
    return _demo_image(rebuild=args.rebuild)


def _demo_image(*, rebuild: bool) -> int:
    import docker

    from labcloud.images import ensure_demo_image

    tag = ensure_demo_image(docker.from_env(), rebuild=rebuild)
    print(f"demo image ready: {tag}")
    return 0


def _exec_module(module: str, args: list[str]) -> NoReturn:
    """Become ``python -m module args``: with the same process id, a signal sent to
    ``labcloud runner`` (SIGTERM from a service manager, Ctrl-C) reaches the runner
    itself; a child process would be left running, still pulling jobs."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", module, *args])  # noqa: S606


def _persistent_secrets(data_dir: Path) -> dict[str, str]:
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


_WILDCARDS = ("0.0.0.0", "::", "")  # noqa: S104 - names of "every interface", not a bind


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _port_problem(host: str, port: int) -> str | None:
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


def _check_ports(host: str, ports: dict[str, int]) -> None:
    if len(set(ports.values())) < len(ports):
        raise _StartupError(f"the ports must differ: {ports}")
    for option, port in ports.items():
        problem = _port_problem(host, port)
        if problem is not None:
            raise _StartupError(
                f"port {port} on {host} is not free ({problem}): another program "
                f"listens there; stop it or choose another port with {option}"
            )


def _up(args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir.resolve()
    advertised: str | None = args.advertise_address
    # Advertising an address only helps if the APIs listen beyond loopback.
    host: str = args.host or ("0.0.0.0" if advertised else "127.0.0.1")  # noqa: S104
    # What this machine's own processes use: loopback when listening everywhere.
    local_host = "127.0.0.1" if host in _WILDCARDS else host
    try:
        _check_ports(host, {"--user-port": args.user_port, "--worker-port": args.worker_port})
    except _StartupError as exc:
        print(f"labcloud up failed: {exc}", file=sys.stderr)
        return 1
    secret = _persistent_secrets(data_dir)
    user_url = _url(local_host, args.user_port)
    worker_url = _url(local_host, args.worker_port)
    # What other machines use: in worker.env and in the URLs the APIs hand out
    # (signed file URLs, the runner settings of ``labcloud admin worker-create``).
    public_user_url = _url(advertised or local_host, args.user_port)
    public_worker_url = _url(advertised or local_host, args.worker_port)
    if not args.skip_demo_image:
        try:
            _demo_image(rebuild=False)
        except Exception as exc:  # docker raises many unrelated types; report and stop
            print(f"cannot prepare the demo image: {exc}", file=sys.stderr)
            print("is the Docker engine running? (`docker info`)", file=sys.stderr)
            return 1

    common = {
        "INTERNAL_API_KEY_SECRET": secret["internal_api_key"],
        "USER_DATA_ROOT_PATH": str(data_dir / "data"),
        "FILESYSTEM": "local",
        "AUTH": "local",
        "LOG_LEVEL": "INFO",
    }
    user_env = {
        **common,
        "DATABASE_URL": f"sqlite:///{data_dir / 'user_api.db'}",
        "LOCAL_AUTH_PRIVATE_KEY": secret["local_auth_key.pem"],
        "PUBLIC_URL": public_user_url,
        "WORKERFACING_API_URL": public_worker_url,
        "APPLICATION_CONFIG_FILE": str(args.catalog.resolve()),
        # Development setting: anyone who reaches the port can create a user account.
        "ALLOW_SELF_SIGNUP": "true",
        "BOOTSTRAP_ADMIN_EMAIL": ADMIN_ACCOUNT,
        "BOOTSTRAP_ADMIN_PASSWORD": secret["admin_password"],
    }
    worker_env = {
        **common,
        "QUEUE_DB_URL": f"sqlite:///{data_dir / 'worker_api.db'}",
        "PUBLIC_URL": public_worker_url,
        "USERFACING_API_URL": user_url,
    }
    services: list[_Service] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    try:
        services.append(
            _start(
                "user-api",
                ["user_api", "--host", host, "--port", str(args.user_port)],
                user_env,
                data_dir,
            )
        )
        _wait_ready(user_url, services)
        services.append(
            _start(
                "worker-api",
                ["worker_api", "--host", host, "--port", str(args.worker_port)],
                worker_env,
                data_dir,
            )
        )
        _wait_ready(worker_url, services)
        # Every runner has an account of its own: the worker API tells runners apart
        # by account, and a runner cleans up the containers its account left behind.
        admin = _admin_headers(user_url, secret)
        jobs = data_dir / "jobs"
        env_file = _worker_env(
            data_dir, "worker", public_user_url, public_worker_url, admin, jobs, via=user_url
        )
        for index in range(1, args.runners + 1):
            runner_env = _worker_env(
                data_dir / "runners",
                f"runner-{index}",
                user_url,
                worker_url,
                admin,
                jobs,
                via=user_url,
            )
            services.append(
                _start(
                    f"runner-{index}",
                    ["worker_runner", "--env-file", str(runner_env)],
                    {},
                    data_dir,
                )
            )
        _print_welcome(public_user_url, public_worker_url, data_dir, env_file, secret)
        while not stopping:
            for service in services:
                if service.process.poll() is not None:
                    print(f"{service.name} exited ({service.process.returncode}); stopping")
                    stopping = True
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    except _StartupError as exc:
        print(f"labcloud up failed: {exc}", file=sys.stderr)
        _stop_all(services)
        return 1
    print("\nstopping LabCloud ...")
    _stop_all(services)
    return 0


class _StartupError(Exception):
    pass


def _start(name: str, module_args: list[str], env: dict[str, str], data_dir: Path) -> _Service:
    log_dir = data_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    log = (log_dir / f"{name}.log").open("ab")
    process = subprocess.Popen(  # noqa: S603 - our own interpreter and modules
        [sys.executable, "-m", *module_args],
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=data_dir,
        # Own process group: Ctrl-C in the terminal reaches only `labcloud up`, which
        # then stops the services in order.
        start_new_session=True,
    )
    logger.info("started %s (pid %s, log %s)", name, process.pid, log.name)
    return _Service(name, process)


def _wait_ready(url: str, services: list[_Service], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for service in services:
            if service.process.poll() is not None:
                raise _StartupError(f"{service.name} exited; see its log in the data folder")
        try:
            if httpx.get(f"{url}/access_info", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise _StartupError(f"{url} did not answer within {timeout:.0f} s")


def _admin_headers(user_url: str, secret: dict[str, str]) -> dict[str, str]:
    token = httpx.post(
        f"{user_url}/token",
        data={"username": ADMIN_ACCOUNT, "password": secret["admin_password"]},
        timeout=30,
    )
    if token.status_code != 201:
        raise _StartupError(f"cannot log in as {ADMIN_ACCOUNT}: {token.text}")
    return {"Authorization": f"Bearer {token.json()['id_token']}"}


def _worker_env(
    folder: Path,
    name: str,
    user_url: str,
    worker_url: str,
    admin: dict[str, str],
    jobs: Path,
    *,
    via: str,
) -> Path:
    """Write ``folder/<name>.env`` for a runner with its own ``workers`` account,
    creating the account the first time (the password is kept in the file).
    ``user_url`` and ``worker_url`` are what the runner will use; ``via`` is
    where this process reaches the user API."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.env"
    account = f"{name}@labcloud.example.org"
    values = _read_env_file(path)
    password = values.get("PASSWORD", "")
    if password_problem(password) is not None:
        password = generate_password()
    created = httpx.post(
        f"{via}/user",
        data={"username": account, "password": password, "groups": ["workers"]},
        headers=admin,
        timeout=30,
    )
    if created.status_code not in (201, 409):
        raise _StartupError(f"cannot create the worker account {account}: {created.text}")
    lines = {
        "API_URL": worker_url,
        "AUTH_URL": user_url,
        "USERNAME": account,
        "PASSWORD": password,
        "PATH_BASE": str(jobs),
        "PATH_HOST_BASE": str(jobs),
        # Keep-alives every 2 s: a cancelled job's container stops within seconds.
        "TIMEOUT_STATUS": "2",
    }
    path.touch(mode=0o600)
    path.write_text(
        "# Settings of one LabCloud worker runner (one account per runner); start it with\n"
        f"#   labcloud runner --env-file {path}\n"
        + "".join(f"{key}={shlex.quote(value)}\n" for key, value in lines.items())
    )
    return path


def _read_env_file(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.startswith("#"):
            values[key.strip()] = (shlex.split(value) or [""])[0]
    return values


def _stop_all(services: list[_Service]) -> None:
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


def _print_welcome(
    user_url: str, worker_url: str, data_dir: Path, env_file: Path, secret: dict[str, str]
) -> None:
    print(
        f"""
LabCloud is up.
  user API    {user_url}   (docs: {user_url}/docs)
  worker API  {worker_url}
  data        {data_dir}
  admin       {ADMIN_ACCOUNT} / password in {data_dir / "admin_password"}
  add a runner (e.g. on a GPU machine): labcloud runner --env-file {env_file}
    (that file holds the account of one more runner; each runner needs its own)
  self-signup is ON: a development setting, never for a public server

Example session (paste in another terminal):

  API={user_url}
  curl -s -X POST $API/user -d username=me@example.org -d password=demo-pass-1
  TOKEN=$(curl -s -X POST $API/token -d username=me@example.org -d password=demo-pass-1 \\
          | python3 -c 'import json,sys; print(json.load(sys.stdin)["id_token"])')
  AUTH="Authorization: Bearer $TOKEN"
  printf 'the quick brown fox\\n' > fox.txt
  curl -s -H "$AUTH" -F file=@fox.txt $API/files/data/texts/upload
  curl -s -H "$AUTH" -H 'content-type: application/json' -X POST $API/jobs -d '{{
    "job_name": "count-1",
    "application": {{"application": "demo", "version": "latest", "entrypoint": "wordcount"}},
    "attributes": {{"files_down": {{"data_ids": ["texts"]}}}}}}'
  curl -s -H "$AUTH" $API/jobs            # repeat until "status":"finished"
  curl -s -H "$AUTH" $API/files/output/count-1/wordcount.txt/download

Press Ctrl-C to stop.
""",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
