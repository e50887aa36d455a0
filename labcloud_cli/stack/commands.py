"""``labcloud up``, ``labcloud runner`` and ``labcloud demo-image``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

from labcloud_cli.stack import setup
from labcloud_cli.stack.processes import (
    Service,
    StartupError,
    exec_module,
    start,
    stop_all,
    wait_ready,
)
from labcloud_cli.stack.setup import ADMIN_ACCOUNT, url

REPO_ROOT = Path(__file__).resolve().parents[2]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``up``, ``runner`` and ``demo-image`` to the ``labcloud`` parser."""
    up = commands.add_parser(
        "up",
        help="start the user API, the worker API and runners",
        description="Start a complete LabCloud on this machine; Ctrl-C stops it.",
    )
    up.set_defaults(run=_up)
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

    runner = commands.add_parser(
        "runner", help="run a worker runner", description="Run a worker runner in this process."
    )
    runner.set_defaults(run=_runner)
    runner.add_argument("--env-file", type=Path, required=True, help="e.g. DIR/worker.env")

    image = commands.add_parser(
        "demo-image",
        help="build the demo tool's Docker image",
        description="Build the demo tool's Docker image (offline from a static busybox).",
    )
    image.set_defaults(run=lambda args: _demo_image(rebuild=args.rebuild))
    image.add_argument("--rebuild", action="store_true")


def _log_to_terminal() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")


def _runner(args: argparse.Namespace) -> int:
    exec_module("worker_runner", ["--env-file", str(args.env_file)])


def _demo_image(*, rebuild: bool) -> int:
    # docker is imported only by the commands that use it: `labcloud admin` runs
    # without it.
    import docker

    from labcloud_cli.images import ensure_demo_image

    _log_to_terminal()
    tag = ensure_demo_image(docker.from_env(), rebuild=rebuild)
    print(f"demo image ready: {tag}")
    return 0


def _up(args: argparse.Namespace) -> int:
    _log_to_terminal()
    data_dir: Path = args.data_dir.resolve()
    advertised: str | None = args.advertise_address
    # Advertising an address only helps if the APIs listen beyond loopback.
    host: str = args.host or ("0.0.0.0" if advertised else "127.0.0.1")  # noqa: S104
    # What this machine's own processes use: loopback when listening everywhere.
    local_host = "127.0.0.1" if host in setup.WILDCARDS else host
    try:
        setup.check_ports(host, {"--user-port": args.user_port, "--worker-port": args.worker_port})
    except StartupError as exc:
        print(f"labcloud up failed: {exc}", file=sys.stderr)
        return 1
    secret = setup.persistent_secrets(data_dir)
    user_url = url(local_host, args.user_port)
    worker_url = url(local_host, args.worker_port)
    # What other machines use: in worker.env and in the URLs the APIs hand out
    # (signed file URLs, the runner settings of ``labcloud admin worker-create``).
    public_user_url = url(advertised or local_host, args.user_port)
    public_worker_url = url(advertised or local_host, args.worker_port)
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
    services: list[Service] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    try:
        user_args = ["user_api", "--host", host, "--port", str(args.user_port)]
        services.append(start("user-api", user_args, user_env, data_dir))
        wait_ready(user_url, services)
        worker_args = ["worker_api", "--host", host, "--port", str(args.worker_port)]
        services.append(start("worker-api", worker_args, worker_env, data_dir))
        wait_ready(worker_url, services)
        # Every runner has an account of its own: the worker API tells runners apart
        # by account, and a runner cleans up the containers its account left behind.
        admin = setup.admin_headers(user_url, secret["admin_password"])
        jobs = data_dir / "jobs"
        env_file = setup.worker_env(
            data_dir, "worker", public_user_url, public_worker_url, admin, jobs, via=user_url
        )
        for index in range(1, args.runners + 1):
            runner_env = setup.worker_env(
                data_dir / "runners",
                f"runner-{index}",
                user_url,
                worker_url,
                admin,
                jobs,
                via=user_url,
            )
            runner_args = ["worker_runner", "--env-file", str(runner_env)]
            services.append(start(f"runner-{index}", runner_args, {}, data_dir))
        _print_welcome(public_user_url, public_worker_url, data_dir, env_file)
        while not stopping:
            for service in services:
                if service.process.poll() is not None:
                    print(f"{service.name} exited ({service.process.returncode}); stopping")
                    stopping = True
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    except StartupError as exc:
        print(f"labcloud up failed: {exc}", file=sys.stderr)
        stop_all(services)
        return 1
    print("\nstopping LabCloud ...")
    stop_all(services)
    return 0


def _print_welcome(user_url: str, worker_url: str, data_dir: Path, env_file: Path) -> None:
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
