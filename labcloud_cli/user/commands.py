"""The users' commands, beside ``up`` and ``admin``: log in once, then work with files
and jobs on that server.

    labcloud login --url https://labcloud.example.org --email ada@example.org
    labcloud upload ./images data/run1
    labcloud run demo/latest/wordcount --name count-1 --data data/run1 --wait
    labcloud download --job count-1

The server is ``--url``, else ``LABCLOUD_URL``, else the one logged in to last; the
token is kept in ``~/.config/labcloud/credentials.json`` (owner-only). Jobs are named
by id or by name. ``--json`` prints the server's answers for scripts.

Exit codes: 0 done, 1 the server refused (or some files failed to move), 2 a usage
error, 3 the server cannot be reached, 4 not logged in (or the login expired or was
refused), 5 ``run --wait``: the job ended in error or was canceled.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from labcloud.contract import Environment, JobStatus
from labcloud_cli.errors import ExitCode, LabCloudCliError, Refused, UsageError
from labcloud_cli.output import as_json
from labcloud_cli.user import credentials, formatting, transfers
from labcloud_cli.user.client import Json, LogsUnavailable, UserClient, Utf8Writer
from labcloud_cli.user.follow import follow_job, stream_log


@dataclass
class Context:
    """What a command works with: the client (logged in, except for ``login``),
    its options, and where progress and messages go (stderr)."""

    client: UserClient
    args: argparse.Namespace
    console: Console

    @property
    def json(self) -> bool:
        return bool(self.args.json)

    def say(self, text: str) -> None:
        """A message for the person at the terminal (stderr)."""
        self.console.print(text, markup=False, highlight=False)


Handler = Callable[[Context], int]


def _print(text: str) -> None:
    print(text, flush=True)


def _write_log(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _write_stderr(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


# -- jobs by id or name -----------------------------------------------------------------


def resolve_job(client: UserClient, ref: str) -> Json:
    """The job whose id (digits) or job_name is ``ref``."""
    if ref.isdigit():
        try:
            return client.job(int(ref))
        except Refused:
            pass  # not an id of this user's jobs: it may still be a job's name
    for job in client.all_jobs():
        if job["job_name"] == ref:
            return client.job(job["id"])
    raise Refused(f"no job with id or name {ref!r}")


# -- login ------------------------------------------------------------------------------


def _login(ctx: Context) -> int:
    args = ctx.args
    email = args.email or input("email: ").strip()
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"password for {email}: ")
    if not email or not password:
        raise UsageError("give an email and a password")
    login = ctx.client.log_in(email, password)
    me = ctx.client.user()
    credentials.save(login)
    if ctx.json:
        _print(as_json({"url": login.url, **me, "expires_at": login.expires_at}))
    else:
        groups = ", ".join(me.get("groups", []))
        _print(f"logged in to {login.url} as {me['email']} (groups: {groups})")
        ctx.say(f"token kept in {credentials.credentials_path()} until {login.expires_at}")
    return ExitCode.OK


def _logout(ctx: Context) -> int:
    forgot = credentials.forget(ctx.client.url)
    _print(f"logged out of {ctx.client.url}" if forgot else f"not logged in to {ctx.client.url}")
    return ExitCode.OK


# -- catalog and files ------------------------------------------------------------------


def _apps(ctx: Context) -> int:
    catalog = ctx.client.applications()
    if ctx.json:
        _print(as_json(catalog))
    else:
        _print(formatting.apps_table(catalog) if catalog else "no applications")
    return ExitCode.OK


def _ls(ctx: Context) -> int:
    entries = ctx.client.list_files(ctx.args.path, recursive=ctx.args.recursive)
    if ctx.json:
        _print(as_json(entries))
    else:
        _print(formatting.files_table(entries) if entries else "(empty)")
    return ExitCode.OK


def _finish_transfer(ctx: Context, report: transfers.Report, verb: str) -> int:
    if ctx.json:
        _print(as_json(report.as_json()))
    else:
        _print(report.summary(verb))
    return ExitCode.REFUSED if report.failed else ExitCode.OK


def _upload(ctx: Context) -> int:
    root, moves = transfers.upload_plan(ctx.args.local, ctx.args.remote)
    report = transfers.upload(
        ctx.client, moves, root, ctx.console, force=ctx.args.force, quiet=ctx.json
    )
    return _finish_transfer(ctx, report, "uploaded")


def _download(ctx: Context) -> int:
    args = ctx.args
    dest: Path | None = args.dest
    if args.job is not None:
        if args.path is not None:
            raise UsageError("give a PATH or --job, not both")
        job = resolve_job(ctx.client, args.job)
        root = dest if dest is not None else Path(job["job_name"])
        moves: list[transfers.Move] = []
        for kind, remote in job["paths_out"].items():
            try:
                moves += transfers.download_plan(ctx.client, remote, root / kind)
            except Refused:
                continue  # this result kind has no folder (nothing was uploaded)
        if not moves:
            raise Refused(
                f"job {job['id']} ({job['job_name']}, {job['status']}) has no results yet"
            )
        report = transfers.download(
            ctx.client, moves, ctx.console, force=args.force, quiet=ctx.json
        )
    elif args.path is None:
        raise UsageError("give a PATH to download, or --job JOB")
    elif args.zip:
        report = transfers.download_zip(ctx.client, args.path, dest, ctx.console, quiet=ctx.json)
    else:
        moves = transfers.download_plan(ctx.client, args.path, dest)
        report = transfers.download(
            ctx.client, moves, ctx.console, force=args.force, quiet=ctx.json
        )
    return _finish_transfer(ctx, report, "downloaded")


# -- jobs -------------------------------------------------------------------------------


def _area_relative(value: str, area: str) -> str:
    """Inputs are paths inside their area; ``data/run1`` is taken as ``run1``."""
    value = value.strip("/")
    return value[len(area) + 1 :] if value.startswith(area + "/") else value


def _env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--env takes KEY=VALUE, not {pair!r}")
        env[key] = value
    return env


def application_ref(client: UserClient, spec: str) -> dict[str, str]:
    """``app/version/entrypoint``, or ``app/entrypoint`` with the version ``latest``
    (or the only version that has that entrypoint)."""
    parts = spec.strip("/").split("/")
    if len(parts) == 3:
        app, version, entrypoint = parts
    elif len(parts) == 2:
        app, entrypoint = parts
        versions = client.applications().get(app) or {}
        having = sorted(v for v, entrypoints in versions.items() if entrypoint in entrypoints)
        if "latest" in having:
            version = "latest"
        elif len(having) == 1:
            version = having[0]
        elif not having:
            raise UsageError(
                f"no application {app!r} with entrypoint {entrypoint!r} (see labcloud apps)"
            )
        else:
            raise UsageError(f"{app}/{entrypoint} has versions {', '.join(having)}: give one")
    else:
        raise UsageError(
            f"{spec!r}: give APP/VERSION/ENTRYPOINT or APP/ENTRYPOINT (see labcloud apps)"
        )
    return {"application": app, "version": version, "entrypoint": entrypoint}


def _run(ctx: Context) -> int:
    args = ctx.args
    application = application_ref(ctx.client, args.app)
    name = args.name or f"{application['entrypoint']}-{datetime.now():%Y%m%d-%H%M%S}"
    files_down: dict[str, Any] = {}
    if args.config:
        files_down["config_id"] = _area_relative(args.config, "config")
    if args.data:
        files_down["data_ids"] = [_area_relative(p, "data") for p in args.data]
    if args.artifact:
        files_down["artifact_ids"] = [_area_relative(p, "artifact") for p in args.artifact]
    hardware = {
        key: value
        for key, value in (
            ("cpu_cores", args.cpus),
            ("memory", args.memory),
            ("gpus", args.gpus),
            ("gpu_mem", args.gpu_mem),
            ("gpu_model", args.gpu_model),
        )
        if value is not None
    }
    body: Json = {
        "job_name": name,
        "hardware": hardware or None,
        "application": application,
        "priority": args.priority,
        "environment": args.environment,
        "attributes": {"files_down": files_down, "env_vars": _env(args.env) or None},
    }
    job = ctx.client.create_job(body)
    if not args.wait:
        _print(as_json(job) if ctx.json else formatting.job_summary(job))
        return ExitCode.OK
    ctx.say(
        f"job {job['id']} ({job['job_name']}) submitted; following it "
        "(Ctrl-C stops following, not the job)"
    )
    # With --json, stdout holds only the final answer: the log goes to stderr.
    log_out = _write_stderr if ctx.json else _write_log
    try:
        job = follow_job(ctx.client, job, ctx.console, log_out=log_out)
    except KeyboardInterrupt:
        ctx.say(
            f"stopped following; job {job['id']} goes on (labcloud logs -f {job['id']}, "
            f"labcloud cancel {job['id']})"
        )
        return 130
    _print(as_json(job) if ctx.json else formatting.job_summary(job))
    return ExitCode.OK if job["status"] == JobStatus.FINISHED else ExitCode.JOB_FAILED


def _jobs(ctx: Context) -> int:
    jobs = ctx.client.jobs(statuses=ctx.args.status, limit=ctx.args.limit)
    if ctx.json:
        _print(as_json(jobs))
    else:
        _print(formatting.jobs_table(jobs) if jobs else "no jobs")
    return ExitCode.OK


def _job(ctx: Context) -> int:
    job = resolve_job(ctx.client, ctx.args.job)
    _print(as_json(job) if ctx.json else formatting.job_summary(job))
    return ExitCode.OK


def _logs(ctx: Context) -> int:
    client = ctx.client
    job = resolve_job(client, ctx.args.job)
    writer = Utf8Writer(_write_log)
    if ctx.args.follow:

        def ended() -> bool:
            return str(client.job(job["id"])["status"]) in formatting.ENDED

        reason = stream_log(client, job["id"], writer, ended)
        writer.flush()
        if reason is None:
            return ExitCode.OK
        ctx.say(f"{reason}; the job's log files:")
    else:
        try:
            offset = 0
            while True:
                page = client.log_page(job["id"], offset)
                writer(page.text)
                if page.complete or not page.text:
                    break
                offset = page.next_offset
            writer.flush()
            return ExitCode.OK
        except LogsUnavailable as exc:
            ctx.say(f"{exc}; the job's log files:")
    return _log_files(ctx, job, writer)


def _log_files(ctx: Context, job: Json, writer: Utf8Writer) -> int:
    """The log files the job left in its log folder (a server without live logs)."""
    folder = job["paths_out"]["log"]
    try:
        entries = ctx.client.list_files(folder, recursive=True)
    except Refused:
        entries = []
    files = [e["path"] for e in entries if e["type"] == "file"]
    if not files:
        ctx.say(f"no log files in {folder}/ yet ({job['status']})")
        return ExitCode.OK
    for path in files:
        ctx.say(f"==> {path} <==")
        with ctx.client.stream_file(path) as chunks:
            for chunk in chunks:
                writer(chunk)
        writer.flush()
    return ExitCode.OK


def _cancel(ctx: Context) -> int:
    job = resolve_job(ctx.client, ctx.args.job)
    job = ctx.client.cancel_job(job["id"])
    _print(as_json(job) if ctx.json else formatting.status_line(job))
    return ExitCode.OK


def _rm(ctx: Context) -> int:
    job = resolve_job(ctx.client, ctx.args.job)
    ctx.client.delete_job(job["id"])
    removed = {"id": job["id"], "job_name": job["job_name"], "removed": True}
    _print(
        as_json(removed)
        if ctx.json
        else f"removed job {job['id']} ({job['job_name']}) and its results"
    )
    return ExitCode.OK


# -- the parser -------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    """The options every user command takes."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=os.environ.get("LABCLOUD_URL"),
        help="user API URL (env LABCLOUD_URL; default: the last login's)",
    )
    common.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    common.add_argument(
        "--json", action="store_true", help="print the server's answers as JSON (for scripts)"
    )
    return common


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the users' commands to the ``labcloud`` parser."""
    common = _common()

    def add(
        name: str, handler: Handler, text: str, *, anonymous: bool = False
    ) -> argparse.ArgumentParser:
        command = commands.add_parser(
            name,
            help=text,
            description=text,
            parents=[common],
            epilog="Exit codes: 0 ok, 1 refused by the server, 2 usage error, 3 server "
            "unreachable, 4 not logged in, 5 (run --wait) the job failed.",
        )
        command.set_defaults(run=lambda args: run(handler, args, anonymous=anonymous))
        return command

    login = add("login", _login, "log in to a LabCloud server and keep the token", anonymous=True)
    login.add_argument("--email", help="your account (else asked)")
    login.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin's first line"
    )
    add("logout", _logout, "forget the token kept for a server", anonymous=True)

    add("apps", _apps, "the applications a job can run, with their descriptions")
    ls = add(
        "ls", _ls, "list your files (no PATH: the areas config/, data/, artifact/, output/, log/)"
    )
    ls.add_argument("path", nargs="?", default="", metavar="PATH")
    ls.add_argument("-r", "--recursive", action="store_true")

    upload = add(
        "upload",
        _upload,
        "upload a file or a folder (files already there with the same size are skipped)",
    )
    upload.add_argument("local", type=Path, metavar="LOCAL")
    upload.add_argument(
        "remote", nargs="?", metavar="REMOTE", help="where it goes (default: data/<LOCAL's name>)"
    )
    upload.add_argument(
        "--force", action="store_true", help="send files again even if already there"
    )

    run_ = add("run", _run, "start a job")
    run_.add_argument("app", metavar="APP[/VERSION]/ENTRYPOINT")
    run_.add_argument("--name", help="the job's name (default: <entrypoint>-<date>-<time>)")
    run_.add_argument(
        "--data",
        nargs="+",
        action="extend",
        default=[],
        metavar="PATH",
        help="data files or folders",
    )
    run_.add_argument("--artifact", nargs="+", action="extend", default=[], metavar="PATH")
    run_.add_argument("--config", metavar="PATH", help="the configuration file or folder")
    run_.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable the entrypoint accepts",
    )
    run_.add_argument("--environment", choices=list(Environment), help="only workers of this kind")
    run_.add_argument("--priority", type=int, default=0, choices=range(6), metavar="0-5")
    run_.add_argument("--cpus", type=int, help="CPU cores it needs")
    run_.add_argument("--memory", type=int, metavar="MIB", help="memory it needs, MiB")
    run_.add_argument("--gpus", type=int, help="GPUs it needs")
    run_.add_argument("--gpu-mem", type=int, metavar="MIB", help="memory per GPU, MiB")
    run_.add_argument("--gpu-model", help="the GPU model it needs")
    run_.add_argument(
        "--wait", action="store_true", help="follow the job to its end (status, progress, live log)"
    )

    jobs = add("jobs", _jobs, "your jobs, newest first")
    jobs.add_argument(
        "--status", action="append", choices=list(JobStatus), help="only these (repeatable)"
    )
    jobs.add_argument("--limit", type=int, default=50)

    add("job", _job, "one job: its status, progress or why it waits").add_argument(
        "job", metavar="JOB"
    )

    logs = add("logs", _logs, "a job's log")
    logs.add_argument("job", metavar="JOB")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new lines until the job ends"
    )

    download = add("download", _download, "download a file, a folder, or a job's results (--job)")
    download.add_argument("path", nargs="?", metavar="PATH")
    download.add_argument("dest", nargs="?", type=Path, metavar="DEST")
    download.add_argument(
        "--job",
        metavar="JOB",
        help="the job's output/, log/ and artifact/ into DEST (default ./<job name>)",
    )
    download.add_argument("--zip", action="store_true", help="a folder as one zip file")
    download.add_argument(
        "--force", action="store_true", help="download files again even if already there"
    )

    add("cancel", _cancel, "cancel a job").add_argument("job", metavar="JOB")
    add("rm", _rm, "remove a job and its results (cancelled first if still active)").add_argument(
        "job", metavar="JOB"
    )


# -- running one command ----------------------------------------------------------------


def run(handler: Handler, args: argparse.Namespace, *, anonymous: bool) -> int:
    """Run one user command; its exit code (see the module docstring)."""
    console = Console(stderr=True)
    url = args.url or None
    try:
        if anonymous and not url and handler is _login:
            raise UsageError("give --url (or set LABCLOUD_URL)")
        url = credentials.server_url(url)
        with UserClient(url, timeout=args.timeout) as client:
            if not anonymous:
                client.use(credentials.login_for(url))
            return handler(Context(client, args, console))
    except UsageError as exc:
        print(f"labcloud: {exc}", file=sys.stderr)
        return exc.exit_code
    except LabCloudCliError as exc:
        print(f"{'refused: ' if isinstance(exc, Refused) else ''}{exc}", file=sys.stderr)
        return exc.exit_code
    except httpx.TransportError as exc:
        print(f"cannot reach {url}: {exc}", file=sys.stderr)
        return ExitCode.UNREACHABLE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
