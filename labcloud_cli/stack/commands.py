"""``labcloud up``, ``labcloud runner`` and ``labcloud demo-image``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path

from labcloud.contract import Group
from labcloud_cli.stack import aws_batch, aws_emulator, setup
from labcloud_cli.stack.aws_batch import StackBackend
from labcloud_cli.stack.env_file import read_stack_env_file
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
DEFAULT_CATALOG = REPO_ROOT / "application_config.yaml"


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
        default=None,
        help="the application catalog (edits take effect without a restart; default: "
        "the repository's application_config.yaml)",
    )
    up.add_argument("--skip-demo-image", action="store_true", help="do not build the demo image")
    up.add_argument(
        "--env-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="settings (KEY=value lines, as in .env.example) given to every service of "
        "the stack; they override the stack's defaults",
    )
    up.add_argument(
        "--aws-emulator",
        action="store_true",
        help="run on a local AWS emulator (moto): S3 storage, Cognito accounts, secrets "
        "by ARN, the catalog on S3. Its state lives in memory: accounts, files and jobs "
        "are gone when the stack stops",
    )
    up.add_argument(
        "--backend",
        choices=[backend.value for backend in StackBackend],
        default=StackBackend.DOCKER.value,
        help="what runs the jobs: the local Docker engine (default), or aws-batch: AWS "
        "Batch on the emulator (needs --aws-emulator), whose jobs run as containers on "
        "this machine; the runners are then cloud workers",
    )
    up.add_argument(
        "--aws-emulator-port",
        type=int,
        default=0,
        metavar="PORT",
        help="port of the AWS emulator (default: a free one)",
    )

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
    # AWS_* lines of the file (a stack on the AWS emulator writes them) go to the
    # environment: boto3, which the runner's Cognito login and secrets use, reads
    # them only from there.
    for name, value in setup.read_env_file(args.env_file).items():
        if name.upper().startswith("AWS_"):
            os.environ[name.upper()] = value
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
    ports = {"--user-port": args.user_port, "--worker-port": args.worker_port}
    batch = StackBackend(args.backend) is StackBackend.AWS_BATCH
    if batch and not args.aws_emulator:
        print(
            "labcloud up failed: --backend aws-batch runs jobs on the AWS emulator's "
            "Batch: add --aws-emulator (a runner on a real AWS Batch is configured as "
            "docs/aws.md describes)",
            file=sys.stderr,
        )
        return 1
    if args.aws_emulator:
        ports["--aws-emulator-port"] = args.aws_emulator_port or setup.free_port(host)
    # Everything that can be refused is checked before anything starts or is written.
    try:
        setup.check_ports(host, ports)
        given = (
            read_stack_env_file(args.env_file, aws_emulator=args.aws_emulator, aws_batch=batch)
            if args.env_file
            else {}
        )
        catalog = _catalog(args.catalog, given, aws_emulator=args.aws_emulator)
        if args.aws_emulator:
            aws_emulator.check_installed()
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
    databases = data_dir
    user_env = {
        **common,
        "LOCAL_AUTH_PRIVATE_KEY": secret["local_auth_key.pem"],
        "PUBLIC_URL": public_user_url,
        "WORKERFACING_API_URL": public_worker_url,
        "APPLICATION_CONFIG_FILE": catalog,
        # Development setting: anyone who reaches the port can create a user account.
        "ALLOW_SELF_SIGNUP": "true",
        "BOOTSTRAP_ADMIN_EMAIL": ADMIN_ACCOUNT,
        "BOOTSTRAP_ADMIN_PASSWORD": secret["admin_password"],
    }
    worker_env = {
        **common,
        "PUBLIC_URL": public_worker_url,
        "USERFACING_API_URL": user_url,
    }
    # Given to the runners' processes: the env file's settings, and in the emulator's
    # mode what points boto3 (their Cognito login) at it.
    runner_env = dict(given)
    runner_file_lines: dict[str, str] = {}
    # Settings only the stack's own runners get (the backend); not in worker.env,
    # which is for one more runner on another machine.
    stack_runner_lines: dict[str, str] = {}
    unset: tuple[str, ...] = ()
    services: list[Service] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    try:
        aws: aws_emulator.EmulatedAws | None = None
        emulated_batch: aws_batch.EmulatedBatch | None = None
        if args.aws_emulator:
            emulator = aws_emulator.start_emulator(
                host,
                ports["--aws-emulator-port"],
                advertised or local_host,
                data_dir,
                services,
            )
            aws = aws_emulator.provision(
                emulator, catalog=Path(catalog), internal_api_key=secret["internal_api_key"]
            )
            aws_emulator.create_account(
                aws, ADMIN_ACCOUNT, secret["admin_password"], (Group.USERS, Group.ADMINS)
            )
            databases = aws_emulator.fresh_state_folder(data_dir)
            if batch:
                emulated_batch = aws_batch.provision_batch(
                    emulator, databases / aws_batch.SHARED_FOLDER
                )
                stack_runner_lines = emulated_batch.runner_settings()
            aws.configure(user_env, worker_env)
            runner_file_lines = emulator.environment()
            runner_env.update(runner_file_lines)
            unset = aws_emulator.inherited_aws_variables()
        user_env["DATABASE_URL"] = f"sqlite:///{databases / 'user_api.db'}"
        worker_env["QUEUE_DB_URL"] = f"sqlite:///{databases / 'worker_api.db'}"
        user_env.update(given)
        worker_env.update(given)

        user_args = ["user_api", "--host", host, "--port", str(args.user_port)]
        services.append(start("user-api", user_args, user_env, data_dir, unset=unset))
        wait_ready(user_url, services)
        worker_args = ["worker_api", "--host", host, "--port", str(args.worker_port)]
        services.append(start("worker-api", worker_args, worker_env, data_dir, unset=unset))
        wait_ready(worker_url, services)
        # Every runner has an account of its own: the worker API tells runners apart
        # by account, and a runner cleans up the containers its account left behind.
        create_account: setup.CreateWorkerAccount
        # The stack's own runners' accounts: with Batch they are cloud workers
        # (groups workers and cloud), which pull the jobs marked for the cloud.
        create_runner_account: setup.CreateWorkerAccount
        if aws is not None:
            create_account = partial(aws_emulator.create_account, aws, groups=(Group.WORKERS,))
            runner_groups = (Group.WORKERS, Group.CLOUD) if batch else (Group.WORKERS,)
            create_runner_account = partial(aws_emulator.create_account, aws, groups=runner_groups)
        else:
            admin = setup.admin_headers(user_url, secret["admin_password"])
            create_account = setup.worker_account_via_api(user_url, admin)
            create_runner_account = create_account
        jobs = data_dir / "jobs"
        env_file = setup.worker_env(
            data_dir,
            "worker",
            public_user_url,
            public_worker_url,
            jobs,
            create_account=create_account,
            extra=runner_file_lines,
        )
        for index in range(1, args.runners + 1):
            runner_file = setup.worker_env(
                data_dir / "runners",
                f"runner-{index}",
                user_url,
                worker_url,
                jobs,
                create_account=create_runner_account,
                extra={**runner_file_lines, **stack_runner_lines},
            )
            runner_args = ["worker_runner", "--env-file", str(runner_file)]
            services.append(
                start(f"runner-{index}", runner_args, runner_env, data_dir, unset=unset)
            )
        _print_welcome(public_user_url, public_worker_url, data_dir, env_file, aws, emulated_batch)
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


def _catalog(option: Path | None, given: dict[str, str], *, aws_emulator: bool) -> str:
    """The catalog the user API reads: ``--catalog``, else the env file's
    ``APPLICATION_CONFIG_FILE`` (which may be ``s3://``), else the repository's. With
    the emulator, the file that is uploaded to its bucket."""
    from_file = given.pop("APPLICATION_CONFIG_FILE", None)
    if option is not None and from_file is not None:
        raise StartupError("give the catalog either with --catalog or in --env-file, not both")
    if from_file is not None:
        return from_file
    chosen = (option or DEFAULT_CATALOG).resolve()
    if not chosen.is_file():
        raise StartupError(f"--catalog {chosen}: no such file")
    return str(chosen)


def _print_welcome(
    user_url: str,
    worker_url: str,
    data_dir: Path,
    env_file: Path,
    aws: aws_emulator.EmulatedAws | None,
    batch: aws_batch.EmulatedBatch | None,
) -> None:
    emulated = ""
    if aws is not None:
        emulated = f"  AWS emulator {aws.emulator.endpoint_url} (moto) with\n{aws.describe()}\n"
        if batch is not None:
            emulated += (
                f"{batch.describe()}\n"
                "  runners     BACKEND=aws-batch, cloud workers (groups workers, cloud):\n"
                "              they take jobs for any environment at once (BATCH_OLDER_THAN=0)\n"
                "              and run them through the emulator's Batch\n"
            )
        emulated += (
            "  the emulator keeps everything in memory: accounts, files and jobs are gone\n"
            "  when the stack stops (its databases start empty each time)\n"
        )
    signup = "self-signup is ON" + (" (through Cognito)" if aws is not None else "")
    print(
        f"""
LabCloud is up.
  user API    {user_url}   (docs: {user_url}/docs)
  worker API  {worker_url}
  data        {data_dir}
{emulated}  admin       {ADMIN_ACCOUNT} / password in {data_dir / "admin_password"}
  add a runner (e.g. on a GPU machine): labcloud runner --env-file {env_file}
    (that file holds the account of one more runner; each runner needs its own)
  {signup}: a development setting, never for a public server

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
