"""``labcloud admin``: the admin routes of a running user API, from a terminal.

    labcloud admin --url https://labcloud.example.org --email admin@example.org \\
        --password-file ~/.labcloud-admin users --status pending

The password comes from ``--password-file`` (its first line) or the environment
variable ``LABCLOUD_ADMIN_PASSWORD``; ``--url`` and ``--email`` may also come from
``LABCLOUD_URL`` and ``LABCLOUD_ADMIN_EMAIL``.

Exit codes: 0 done, 1 the server refused (its message is printed), 2 a usage
error, 3 the server cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

_GROUPS = ("users", "workers", "cloud", "admins")
_ACCOUNT_STATUSES = ("pending", "active", "disabled")
_JOB_STATUSES = (
    "queued",
    "pulled",
    "preprocessing",
    "running",
    "postprocessing",
    "finished",
    "error",
    "canceled",
)
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


_NOT_GIVEN = object()


class UsageError(Exception):
    """The command line is wrong (exit code 2)."""


class Refused(Exception):
    """The server answered with an error (exit code 1)."""


# -- argument parsing -----------------------------------------------------------------


def _count(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {value!r}")
    return number


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="labcloud admin",
        description="Administer a running LabCloud user API (needs an account in 'admins').",
        epilog="Exit codes: 0 ok, 1 refused by the server, 2 usage error, 3 server unreachable.",
    )
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
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    users = commands.add_parser("users", help="list and search accounts")
    users.add_argument("--search", help="part of the email")
    users.add_argument("--status", choices=_ACCOUNT_STATUSES)
    users.add_argument("--offset", type=_count, default=0)
    users.add_argument("--limit", type=_count, default=50)

    for name, text in (
        ("approve", "let a self-signed-up account use the service"),
        ("disable", "disable an account (its tokens stop working)"),
        ("enable", "enable a disabled account"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("account", metavar="EMAIL")

    groups = commands.add_parser("groups", help="set an account's groups")
    groups.add_argument("account", metavar="EMAIL")
    groups.add_argument("groups", nargs="+", choices=_GROUPS, metavar="GROUP")

    limits = commands.add_parser("limits", help="set an account's limits")
    limits.add_argument("account", metavar="EMAIL")
    # "default" parses to None, so an option left out needs a value of its own.
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

    worker = commands.add_parser("worker-create", help="create a worker account for a runner")
    worker.add_argument("name", help="e.g. gpu-box-1")
    worker.add_argument("--cloud", action="store_true", help="also in group 'cloud'")
    worker.add_argument(
        "--env-file", type=Path, help="write the runner's settings here (else to stdout)"
    )

    commands.add_parser("queue", help="jobs by status, environment and application")

    jobs = commands.add_parser("jobs", help="list any user's jobs")
    jobs.add_argument("--status", choices=_JOB_STATUSES)
    jobs.add_argument("--user", help="owner's email")
    jobs.add_argument("--offset", type=_count, default=0)
    jobs.add_argument("--limit", type=_count, default=100)

    cancel = commands.add_parser("cancel", help="cancel any user's job")
    cancel.add_argument("job_id", type=int)

    commands.add_parser("catalog", help="the application catalog in use, and its last error")

    audit = commands.add_parser("audit", help="the audit log, newest first")
    audit.add_argument("--offset", type=_count, default=0)
    audit.add_argument("--limit", type=_count, default=50)
    return parser


# -- output ---------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], numeric: int = 0) -> str:
    """Columns aligned with two spaces between them; the last ``numeric`` columns
    are right-aligned."""
    cells = [[str(h) for h in headers], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    first_numeric = len(headers) - numeric
    lines = []
    for row in cells:
        parts = [
            cell.rjust(width) if index >= first_numeric else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def human_bytes(count: int | None) -> str:
    """``1536`` -> ``1.5 KiB``; None -> ``unlimited``."""
    if count is None:
        return "unlimited"
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{count} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _when(value: str | None) -> str:
    if not value:
        return ""
    # The server sends UTC; admins read their own clock.
    return datetime.fromisoformat(value).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def _user_rows(users: list[dict[str, Any]]) -> str:
    rows = []
    for user in users:
        limits = user["limits"]
        jobs_limit = limits["max_active_jobs"]
        rows.append(
            [
                user["email"],
                user["status"],
                ",".join(user["groups"]),
                _when(user["created_at"]),
                f"{user['active_jobs']} / {'unlimited' if jobs_limit is None else jobs_limit}",
                f"{human_bytes(user['bytes_stored'])} / {human_bytes(limits['max_storage_bytes'])}",
            ]
        )
    return table(["EMAIL", "STATUS", "GROUPS", "CREATED", "ACTIVE JOBS", "STORED"], rows, 2)


def _job_rows(jobs: list[dict[str, Any]]) -> str:
    rows = [
        [
            job["id"],
            job["job_name"],
            job["owner"],
            job["status"],
            job["application"],
            job["environment"] or "any",
            _when(job["date_created"]),
        ]
        for job in jobs
    ]
    return table(["ID", "NAME", "OWNER", "STATUS", "APPLICATION", "ENV", "CREATED"], rows)


# -- the server -----------------------------------------------------------------------


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        return f"HTTP {response.status_code}: {response.text[:500]}"
    if isinstance(detail, list):  # request validation: one line per problem
        return "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', [])[1:])}: {item.get('msg')}"
            for item in detail
        )
    return str(detail) if detail else f"HTTP {response.status_code}"


class AdminClient:
    """The admin routes, authenticated as one admin."""

    def __init__(self, url: str, *, timeout: float) -> None:
        self._http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def login(self, email: str, password: str) -> None:
        response = self._http.post("/token", data={"username": email, "password": password})
        if response.status_code != 201:
            raise Refused(f"login as {email} failed: {_detail(response)}")
        self._http.headers["Authorization"] = f"Bearer {response.json()['id_token']}"

    def call(
        self, method: str, path: str, *, json_body: Any = None, params: dict[str, Any] | None = None
    ) -> Any:
        query = {key: value for key, value in (params or {}).items() if value is not None}
        response = self._http.request(method, path, json=json_body, params=query)
        if response.is_error:
            raise Refused(_detail(response))
        return response.json()


def _user_path(email: str, action: str) -> str:
    return f"/admin/users/{quote(email, safe='@')}/{action}"


# -- commands -------------------------------------------------------------------------


def _users(client: AdminClient, args: argparse.Namespace) -> str:
    params = {
        "search": args.search,
        "status": args.status,
        "offset": args.offset,
        "limit": args.limit,
    }
    users = client.call("GET", "/admin/users", params=params)
    return _user_rows(users) if users else "no accounts match"


def _account_action(action: str, done: str) -> Callable[[AdminClient, argparse.Namespace], str]:
    def run(client: AdminClient, args: argparse.Namespace) -> str:
        user = client.call("POST", _user_path(args.account, action))
        return f"{done} {user['email']}\n\n{_user_rows([user])}"

    return run


def _groups(client: AdminClient, args: argparse.Namespace) -> str:
    user = client.call("PUT", _user_path(args.account, "groups"), json_body={"groups": args.groups})
    return f"groups of {user['email']}: {', '.join(user['groups'])}\n\n{_user_rows([user])}"


def _limits(client: AdminClient, args: argparse.Namespace) -> str:
    body: dict[str, Any] = {}
    if args.jobs is not _NOT_GIVEN:
        body["max_active_jobs"] = args.jobs
    if args.storage is not _NOT_GIVEN:
        body["max_storage_bytes"] = args.storage
    user = client.call("PUT", _user_path(args.account, "limits"), json_body=body)
    own = user["own_limits"]
    return (
        f"limits of {user['email']}: active jobs "
        f"{_own(own['max_active_jobs'], user['limits']['max_active_jobs'], str)}, storage "
        f"{_own(own['max_storage_bytes'], user['limits']['max_storage_bytes'], human_bytes)}"
        f"\n\n{_user_rows([user])}"
    )


def _own(own: int | None, in_force: int | None, show: Callable[[int], str]) -> str:
    shown = "unlimited" if in_force is None else show(in_force)
    return shown if own is not None else f"{shown} (the default)"


def _worker_create(client: AdminClient, args: argparse.Namespace) -> str:
    target: Path | None = args.env_file
    if target is not None and target.exists():
        raise UsageError(f"{target} exists; choose another file (it would hold a new password)")
    created = client.call(
        "POST", "/admin/workers", json_body={"name": args.name, "cloud": args.cloud}
    )
    if target is None:
        return str(created["env_file"]).rstrip("\n")
    # Created readable by its owner only: the file holds the account's password.
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(created["env_file"])
    return (
        f"worker account {created['email']} created (groups: {', '.join(created['groups'])})\n"
        f"runner settings written to {target}; start it with:\n"
        f"  labcloud runner --env-file {target}"
    )


def _queue(client: AdminClient, _args: argparse.Namespace) -> str:
    overview = client.call("GET", "/admin/queue")
    parts = [
        "Jobs by status",
        table(["STATUS", "JOBS"], list(overview["by_status"].items()), 1),
    ]
    for title, key, label in (
        ("Active jobs by environment", "by_environment", "ENVIRONMENT"),
        ("Active jobs by application", "by_application", "APPLICATION"),
    ):
        rows = [[name, c["queued"], c["running"]] for name, c in overview[key].items()]
        parts += ["", title, table([label, "QUEUED", "RUNNING"], rows, 2) if rows else "  none"]
    oldest = overview["oldest_queued"]
    parts.append("")
    if oldest:
        parts.append(
            f"Oldest queued job: {oldest['id']} ({oldest['job_name']}, {oldest['owner']}), "
            f"waiting {_duration(oldest['age_seconds'])}"
        )
    else:
        parts.append("No job is waiting for a worker.")
    return "\n".join(parts)


def _jobs(client: AdminClient, args: argparse.Namespace) -> str:
    params = {"status": args.status, "user": args.user, "offset": args.offset, "limit": args.limit}
    jobs = client.call("GET", "/admin/jobs", params=params)
    return _job_rows(jobs) if jobs else "no jobs match"


def _cancel(client: AdminClient, args: argparse.Namespace) -> str:
    job = client.call("POST", f"/admin/jobs/{args.job_id}/cancel")
    return f"job {job['id']} ({job['job_name']}, {job['owner']}) is {job['status']}"


def _catalog(client: AdminClient, _args: argparse.Namespace) -> str:
    status = client.call("GET", "/admin/catalog")
    lines = [
        f"file       {status['path']}",
        f"version    {status['version']}",
        f"loaded at  {_when(status['loaded_at'])}",
    ]
    if status.get("last_error"):
        lines.append(f"last error {_when(status.get('last_error_at'))} (the version above stays)")
        lines.extend(f"  {line}" for line in str(status["last_error"]).splitlines())
    else:
        lines.append("last error none")
    return "\n".join(lines)


def _audit(client: AdminClient, args: argparse.Namespace) -> str:
    entries = client.call(
        "GET", "/admin/audit", params={"offset": args.offset, "limit": args.limit}
    )
    rows = [
        [
            _when(entry["at"]),
            entry["actor"],
            entry["action"],
            entry["target"],
            json.dumps(entry["details"], sort_keys=True) if entry["details"] else "",
        ]
        for entry in entries
    ]
    return table(["AT", "ACTOR", "ACTION", "TARGET", "DETAILS"], rows) if rows else "no entries"


_COMMANDS: dict[str, Callable[[AdminClient, argparse.Namespace], str]] = {
    "users": _users,
    "approve": _account_action("approve", "approved"),
    "disable": _account_action("disable", "disabled"),
    "enable": _account_action("enable", "enabled"),
    "groups": _groups,
    "limits": _limits,
    "worker-create": _worker_create,
    "queue": _queue,
    "jobs": _jobs,
    "cancel": _cancel,
    "catalog": _catalog,
    "audit": _audit,
}


# -- entry point ----------------------------------------------------------------------


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


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.url:
        parser.error("give --url (or set LABCLOUD_URL)")
    if not args.email:
        parser.error("give --email (or set LABCLOUD_ADMIN_EMAIL)")
    if args.command == "limits" and args.jobs is _NOT_GIVEN and args.storage is _NOT_GIVEN:
        parser.error("limits: give --jobs and/or --bytes")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run one admin command; the exit code (see the module docstring)."""
    try:
        args = _parse(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    client = AdminClient(args.url, timeout=args.timeout)
    try:
        client.login(args.email, _password(args))
        output = _COMMANDS[args.command](client, args)
    except UsageError as exc:
        print(f"labcloud admin: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Refused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except httpx.TransportError as exc:
        print(f"cannot reach {args.url}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    finally:
        client.close()
    print(output)
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
