"""The users' commands' answers as text: the catalog, file listings, jobs, and a job's
one-line status (with its progress, or why it waits)."""

from __future__ import annotations

from datetime import UTC, datetime

from labcloud_cli.output import duration, human_bytes, local_time, table
from labcloud_cli.user.client import Json

ENDED = frozenset({"finished", "error", "canceled"})


def apps_table(catalog: Json) -> str:
    rows = []
    for app, versions in sorted(catalog.items()):
        for version, entrypoints in sorted(versions.items()):
            for name, entrypoint in sorted(entrypoints.items()):
                env = (entrypoint.get("app") or {}).get("env") or []
                inputs = sorted((entrypoint.get("handler") or {}).get("files_down") or {})
                rows.append(
                    [
                        f"{app}/{version}/{name}",
                        ",".join(env),
                        ",".join(_flag(kind) for kind in inputs),
                        entrypoint.get("description") or "",
                    ]
                )
    return table(["APPLICATION", "ENV", "INPUTS", "DESCRIPTION"], rows)


def _flag(kind: str) -> str:
    """An input kind as ``labcloud run`` takes it: ``data_ids`` -> ``--data``."""
    return "--" + kind.removesuffix("_ids").removesuffix("_id")


def files_table(entries: list[Json]) -> str:
    rows = [
        [
            entry["path"],
            entry["type"],
            "" if entry["type"] == "directory" else human_bytes(entry.get("size_bytes", 0)),
        ]
        for entry in entries
    ]
    return table(["PATH", "TYPE", "SIZE"], rows, 1)


def _ran_for(job: Json) -> str:
    started = job.get("date_started")
    if not started:
        return ""
    end = job.get("date_finished")
    until = datetime.fromisoformat(end) if end else datetime.now(UTC)
    begun = datetime.fromisoformat(started)
    if begun.tzinfo is None:
        begun = begun.replace(tzinfo=UTC)
    if until.tzinfo is None:
        until = until.replace(tzinfo=UTC)
    return duration(max(0.0, (until - begun).total_seconds()))


def progress_text(job: Json) -> str:
    """``42% fitting frame 3``: the tool's last progress report, if any."""
    progress = job.get("progress") or {}
    fraction, message = progress.get("fraction"), progress.get("message")
    parts = [f"{fraction * 100:.0f}%" if fraction is not None else "", message or ""]
    return " ".join(part for part in parts if part)


def jobs_table(jobs: list[Json]) -> str:
    """The list (the server sends progress and waiting reasons for one job only:
    ``labcloud job JOB`` shows them)."""
    rows = [
        [
            job["id"],
            job["job_name"],
            job["status"],
            "/".join(job["application"][k] for k in ("application", "version", "entrypoint")),
            local_time(job["date_created"]),
            _ran_for(job),
        ]
        for job in jobs
    ]
    return table(["ID", "NAME", "STATUS", "APPLICATION", "CREATED", "RAN"], rows)


def status_line(job: Json, *, elapsed: bool = True) -> str:
    """``job 12 (fit-1): running 3m 2s, 42% fitting`` or ``... queued - <why>``;
    without the time it has run for unless ``elapsed``."""
    line = f"job {job['id']} ({job['job_name']}): {job['status']}"
    ran = _ran_for(job) if elapsed else ""
    if ran and job["status"] not in ENDED:
        line += f" {ran}"
    waiting = job.get("waiting")
    if job["status"] == "queued" and waiting:
        line += f" - {waiting.get('message') or waiting.get('reason')}"
        if waiting.get("position"):
            line += f" (position {waiting['position']})"
    shown = progress_text(job)
    if shown and job["status"] not in ENDED:
        line += f", {shown}"
    return line


def job_summary(job: Json) -> str:
    """What ``run`` and ``cancel`` print: the status line and where results go."""
    paths = job.get("paths_out") or {}
    lines = [status_line(job)]
    if paths:
        lines.append(f"results: {paths.get('output')}/  logs: {paths.get('log')}/")
    if job["status"] in ("error", "canceled") and job.get("runtime_details"):
        lines.append(job["runtime_details"].rstrip())
    return "\n".join(lines)
