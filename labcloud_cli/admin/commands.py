"""``labcloud admin``'s subcommands: their options, what each does, and exit codes.

    labcloud admin --url https://labcloud.example.org --email admin@example.org \\
        --password-file ~/.labcloud-admin users --status pending

The password comes from ``--password-file`` (its first line) or the environment
variable ``LABCLOUD_ADMIN_PASSWORD``; ``--url`` and ``--email`` may also come from
``LABCLOUD_URL`` and ``LABCLOUD_ADMIN_EMAIL``. ``--json`` prints the server's answer
for scripts instead of a table.

Exit codes: 0 done, 1 the server refused (its message is printed), 2 a usage error,
3 the server cannot be reached.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import httpx

from labcloud.contract import AccountStatus, Group, JobStatus
from labcloud_cli.admin import formatting
from labcloud_cli.admin.client import AdminClient
from labcloud_cli.errors import ExitCode, LabCloudCliError, UsageError
from labcloud_cli.output import as_json

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
# "default" parses to None (back to the server's default), so an option left out
# needs a value of its own.
_NOT_GIVEN: Any = object()


@dataclass(frozen=True)
class Shown:
    """A command's result: the server's answer (for ``--json``) and its text."""

    data: Any
    text: str


Handler = Callable[[AdminClient, argparse.Namespace], Shown]
Choice = TypeVar("Choice", bound=StrEnum)


# -- option values --------------------------------------------------------------------


def _count(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {value!r}")
    return number


def _one_of(kind: type[Choice]) -> Callable[[str], Choice]:
    """An option whose values are the contract's enum ``kind``."""

    def parse(value: str) -> Choice:
        try:
            return kind(value)
        except ValueError:
            allowed = ", ".join(kind)
            raise argparse.ArgumentTypeError(
                f"invalid choice: {value!r} (choose from {allowed})"
            ) from None

    parse.__name__ = kind.__name__
    return parse


def _job_limit(value: str) -> int | None:
    """A number of jobs, or ``default`` (None: the server's default)."""
    return None if value.lower() == "default" else _count(value)


def parse_size(value: str) -> int | None:
    """Bytes from ``"1000"``, ``"1.5GB"``, ``"100GiB"``; ``"default"`` gives None."""
    if value.lower() == "default":
        return None
    match = _SIZE.match(value)
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise argparse.ArgumentTypeError(
            f"not a size: {value!r} (e.g. 500000000, 500MB, 100GiB, or 'default')"
        )
    return int(float(match.group(1)) * unit)


# -- the commands ---------------------------------------------------------------------


def _users(client: AdminClient, args: argparse.Namespace) -> Shown:
    users = client.users(
        search=args.search, status=args.status, offset=args.offset, limit=args.limit
    )
    return Shown(users, formatting.users_table(users) if users else "no accounts match")


def _account_action(action: str, done: str) -> Handler:
    def run(client: AdminClient, args: argparse.Namespace) -> Shown:
        user = client.account_action(args.account, action)
        return Shown(user, f"{done} {user['email']}\n\n{formatting.users_table([user])}")

    return run


def _groups(client: AdminClient, args: argparse.Namespace) -> Shown:
    user = client.set_groups(args.account, args.groups)
    groups = ", ".join(user["groups"])
    return Shown(user, f"groups of {user['email']}: {groups}\n\n{formatting.users_table([user])}")


def _limits(client: AdminClient, args: argparse.Namespace) -> Shown:
    changes: dict[str, int | None] = {}
    if args.jobs is not _NOT_GIVEN:
        changes["max_active_jobs"] = args.jobs
    if args.storage is not _NOT_GIVEN:
        changes["max_storage_bytes"] = args.storage
    user = client.set_limits(args.account, changes)
    return Shown(
        user,
        f"limits of {user['email']}: {formatting.limits_summary(user)}"
        f"\n\n{formatting.users_table([user])}",
    )


def _worker_create(client: AdminClient, args: argparse.Namespace) -> Shown:
    target: Path | None = args.env_file
    if target is not None and target.exists():
        raise UsageError(f"{target} exists; choose another file (it would hold a new password)")
    created = client.create_worker(args.name, cloud=args.cloud)
    if target is None:
        return Shown(created, str(created["env_file"]).rstrip("\n"))
    # Created readable by its owner only: the file holds the account's password.
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(created["env_file"])
    # The password went into the file; the output (often a terminal log) names it.
    summary = {"email": created["email"], "groups": created["groups"], "env_file": str(target)}
    return Shown(
        summary,
        f"worker account {created['email']} created (groups: {', '.join(created['groups'])})\n"
        f"runner settings written to {target}; start it with:\n"
        f"  labcloud runner --env-file {target}",
    )


def _workers(client: AdminClient, _args: argparse.Namespace) -> Shown:
    workers = client.workers()
    if not workers:
        return Shown(workers, "no worker is connected")
    return Shown(workers, formatting.workers_table(workers, now=datetime.now(UTC)))


def _queue(client: AdminClient, _args: argparse.Namespace) -> Shown:
    overview = client.queue()
    return Shown(overview, formatting.queue_overview(overview))


def _jobs(client: AdminClient, args: argparse.Namespace) -> Shown:
    jobs = client.jobs(status=args.status, user=args.user, offset=args.offset, limit=args.limit)
    return Shown(jobs, formatting.jobs_table(jobs) if jobs else "no jobs match")


def _cancel(client: AdminClient, args: argparse.Namespace) -> Shown:
    job = client.cancel_job(args.job_id)
    return Shown(job, f"job {job['id']} ({job['job_name']}, {job['owner']}) is {job['status']}")


def _catalog(client: AdminClient, _args: argparse.Namespace) -> Shown:
    status = client.catalog()
    return Shown(status, formatting.catalog_status(status))


def _audit(client: AdminClient, args: argparse.Namespace) -> Shown:
    entries = client.audit(offset=args.offset, limit=args.limit)
    return Shown(entries, formatting.audit_table(entries) if entries else "no entries")


# -- the parser -----------------------------------------------------------------------


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``admin`` and its subcommands to the ``labcloud`` parser."""
    parser = commands.add_parser(
        "admin",
        help="administer a running user API (see: labcloud admin --help)",
        description="Administer a running LabCloud user API (needs an account in 'admins').",
        epilog="Exit codes: 0 ok, 1 refused by the server, 2 usage error, 3 server unreachable.",
    )
    parser.set_defaults(run=lambda args: run(parser, args))
    parser.add_argument("--url", default=os.environ.get("LABCLOUD_URL"), help="user API URL")
    parser.add_argument(
        "--email", default=os.environ.get("LABCLOUD_ADMIN_EMAIL"), help="admin account"
    )
    parser.add_argument(
        "--password-file",
        type=Path,
        help="file whose first line is the password (else env LABCLOUD_ADMIN_PASSWORD)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument(
        "--json", action="store_true", help="print the server's answer as JSON (for scripts)"
    )
    admin = parser.add_subparsers(dest="admin_command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, text: str) -> argparse.ArgumentParser:
        command = admin.add_parser(name, help=text, description=text)
        command.set_defaults(handler=handler)
        return command

    users = add("users", _users, "list and search accounts")
    users.add_argument("--search", help="part of the email")
    users.add_argument("--status", type=_one_of(AccountStatus), choices=list(AccountStatus))
    users.add_argument("--offset", type=_count, default=0)
    users.add_argument("--limit", type=_count, default=50)

    for action, done, text in (
        ("approve", "approved", "let a self-signed-up account use the service"),
        ("disable", "disabled", "disable an account (its tokens stop working)"),
        ("enable", "enabled", "enable a disabled account"),
    ):
        add(action, _account_action(action, done), text).add_argument("account", metavar="EMAIL")

    groups = add("groups", _groups, "set an account's groups")
    groups.add_argument("account", metavar="EMAIL")
    groups.add_argument(
        "groups", nargs="+", type=_one_of(Group), choices=list(Group), metavar="GROUP"
    )

    limits = add("limits", _limits, "set an account's limits")
    limits.add_argument("account", metavar="EMAIL")
    limits.add_argument(
        "--jobs", type=_job_limit, default=_NOT_GIVEN, help="active jobs, or 'default'"
    )
    limits.add_argument(
        "--bytes",
        type=parse_size,
        dest="storage",
        default=_NOT_GIVEN,
        help="bytes stored (e.g. 100GiB), or 'default'",
    )

    worker = add("worker-create", _worker_create, "create a worker account for a runner")
    worker.add_argument("name", help="e.g. gpu-box-1")
    worker.add_argument("--cloud", action="store_true", help="also in group 'cloud'")
    worker.add_argument(
        "--env-file", type=Path, help="write the runner's settings here (else to stdout)"
    )

    add("workers", _workers, "connected workers: capacity offered, last seen, current jobs")

    add("queue", _queue, "jobs by status, environment and application")

    jobs = add("jobs", _jobs, "list any user's jobs")
    jobs.add_argument("--status", type=_one_of(JobStatus), choices=list(JobStatus))
    jobs.add_argument("--user", help="owner's email")
    jobs.add_argument("--offset", type=_count, default=0)
    jobs.add_argument("--limit", type=_count, default=100)

    add("cancel", _cancel, "cancel any user's job").add_argument("job_id", type=int)

    add("catalog", _catalog, "the application catalog in use, and its last error")

    audit = add("audit", _audit, "the audit log, newest first")
    audit.add_argument("--offset", type=_count, default=0)
    audit.add_argument("--limit", type=_count, default=50)


# -- running one command --------------------------------------------------------------


def _usage_problem(args: argparse.Namespace) -> str | None:
    """What argparse cannot check: values that may come from the environment, and
    ``limits`` without a limit to set."""
    if not args.url:
        return "give --url (or set LABCLOUD_URL)"
    if not args.email:
        return "give --email (or set LABCLOUD_ADMIN_EMAIL)"
    if args.handler is _limits and args.jobs is _NOT_GIVEN and args.storage is _NOT_GIVEN:
        return "limits: give --jobs and/or --bytes"
    return None


def _password(args: argparse.Namespace) -> str:
    password_file: Path | None = args.password_file
    if password_file is not None:
        try:
            lines = password_file.read_text().splitlines()
        except OSError as exc:
            raise UsageError(f"cannot read the password file: {exc}") from exc
        if not lines or not lines[0].strip():
            raise UsageError(f"the password file {password_file} is empty")
        return lines[0].strip()
    password = os.environ.get("LABCLOUD_ADMIN_PASSWORD")
    if not password:
        raise UsageError("give --password-file FILE or set LABCLOUD_ADMIN_PASSWORD")
    return password


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Sign in and run one admin command; the exit code (see the module docstring)."""
    problem = _usage_problem(args)
    if problem is not None:
        # As argparse reports its own errors: the usage line, then the problem.
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {problem}", file=sys.stderr)
        return ExitCode.USAGE
    handler: Handler = args.handler
    with AdminClient(args.url, timeout=args.timeout) as client:
        try:
            client.login(args.email, _password(args))
            shown = handler(client, args)
        except UsageError as exc:
            print(f"labcloud admin: {exc}", file=sys.stderr)
            return exc.exit_code
        except LabCloudCliError as exc:
            print(f"refused: {exc}", file=sys.stderr)
            return exc.exit_code
        except httpx.TransportError as exc:
            print(f"cannot reach {args.url}: {exc}", file=sys.stderr)
            return ExitCode.UNREACHABLE
    print(as_json(shown.data) if args.json else shown.text)
    return ExitCode.OK
