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
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from labcloud import admin_cli
from labcloud.auth.local import generate_private_key_pem

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
    up.add_argument("--host", default="127.0.0.1", help="address the APIs listen on")
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
        return _run_module("worker_runner", ["--env-file", str(args.env_file)])
    return _demo_image(rebuild=args.rebuild)


def _demo_image(*, rebuild: bool) -> int:
    import docker

    from labcloud.images import ensure_demo_image

    tag = ensure_demo_image(docker.from_env(), rebuild=rebuild)
    print(f"demo image ready: {tag}")
    return 0


def _run_module(module: str, args: list[str]) -> int:
    return subprocess.call([sys.executable, "-m", module, *args])  # noqa: S603


def _persistent_secrets(data_dir: Path) -> dict[str, str]:
    """Secrets generated once per data folder, so tokens and accounts survive a
    restart of the stack. Files are readable by their owner only."""
    data_dir.mkdir(parents=True, exist_ok=True)
    values: dict[str, str] = {}
    makers: tuple[tuple[str, Callable[[], str]], ...] = (
        ("internal_api_key", lambda: secrets.token_urlsafe(32)),
        ("local_auth_key.pem", generate_private_key_pem),
        ("admin_password", lambda: secrets.token_urlsafe(18)),
    )
    for name, make in makers:
        path = data_dir / name
        if not path.exists():
            path.touch(mode=0o600)
            path.write_text(make())
        values[name] = path.read_text().strip()
    return values


def _up(args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir.resolve()
    secret = _persistent_secrets(data_dir)
    user_url = f"http://{args.host}:{args.user_port}"
    worker_url = f"http://{args.host}:{args.worker_port}"
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
        "PUBLIC_URL": user_url,
        "WORKERFACING_API_URL": worker_url,
        "APPLICATION_CONFIG_FILE": str(args.catalog.resolve()),
        # Development setting: anyone who reaches the port can create a user account.
        "ALLOW_SELF_SIGNUP": "true",
        "BOOTSTRAP_ADMIN_EMAIL": ADMIN_ACCOUNT,
        "BOOTSTRAP_ADMIN_PASSWORD": secret["admin_password"],
    }
    worker_env = {
        **common,
        "QUEUE_DB_URL": f"sqlite:///{data_dir / 'worker_api.db'}",
        "PUBLIC_URL": worker_url,
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
                ["user_api", "--host", args.host, "--port", str(args.user_port)],
                user_env,
                data_dir,
            )
        )
        _wait_ready(user_url, services)
        services.append(
            _start(
                "worker-api",
                ["worker_api", "--host", args.host, "--port", str(args.worker_port)],
                worker_env,
                data_dir,
            )
        )
        _wait_ready(worker_url, services)
        # Every runner has an account of its own: the worker API tells runners apart
        # by account, and a runner cleans up the containers its account left behind.
        admin = _admin_headers(user_url, secret)
        jobs = data_dir / "jobs"
        env_file = _worker_env(data_dir, "worker", user_url, worker_url, admin, jobs)
        for index in range(1, args.runners + 1):
            runner_env = _worker_env(
                data_dir / "runners", f"runner-{index}", user_url, worker_url, admin, jobs
            )
            services.append(
                _start(
                    f"runner-{index}",
                    ["worker_runner", "--env-file", str(runner_env)],
                    {},
                    data_dir,
                )
            )
        _print_welcome(user_url, worker_url, data_dir, env_file, secret)
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
) -> Path:
    """Write ``folder/<name>.env`` for a runner with its own ``workers`` account,
    creating the account the first time (the password is kept in the file)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.env"
    account = f"{name}@labcloud.example.org"
    values = _read_env_file(path)
    password = values.get("PASSWORD") or secrets.token_urlsafe(18)
    created = httpx.post(
        f"{user_url}/user",
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
