"""The admin commands' answers as text: tables of accounts, jobs and audit entries,
the queue overview and the catalog status."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime

from labcloud_cli.admin.client import Json
from labcloud_cli.output import duration, human_bytes, local_time, table

_MIB = 1024 * 1024


def users_table(users: list[Json]) -> str:
    rows = []
    for user in users:
        limits = user["limits"]
        jobs_limit = limits["max_active_jobs"]
        rows.append(
            [
                user["email"],
                user["status"],
                ",".join(user["groups"]),
                local_time(user["created_at"]),
                f"{user['active_jobs']} / {'unlimited' if jobs_limit is None else jobs_limit}",
                f"{human_bytes(user['bytes_stored'])} / {human_bytes(limits['max_storage_bytes'])}",
            ]
        )
    return table(["EMAIL", "STATUS", "GROUPS", "CREATED", "ACTIVE JOBS", "STORED"], rows, 2)


def limits_summary(user: Json) -> str:
    """``active jobs 3, storage 1.5 GiB (the default)``: the limits in force, marking
    those the account takes from the server's defaults."""
    own, in_force = user["own_limits"], user["limits"]
    jobs = _limit(own["max_active_jobs"], in_force["max_active_jobs"], str)
    storage = _limit(own["max_storage_bytes"], in_force["max_storage_bytes"], human_bytes)
    return f"active jobs {jobs}, storage {storage}"


def _limit(own: int | None, in_force: int | None, show: Callable[[int], str]) -> str:
    shown = "unlimited" if in_force is None else show(in_force)
    return shown if own is not None else f"{shown} (the default)"


def ran_on(job: Json) -> str:
    """``runner-1 (aws-batch 3f2c…)``: where a job's last attempt ran, from its
    outcome (empty for a job that has not ended, or one from an older runner)."""
    outcome = job.get("outcome") or {}
    runner, backend, run_id = (outcome.get(key) for key in ("runner", "backend", "run_id"))
    if not runner and not backend:
        return ""
    where = " ".join(str(part) for part in (backend, (run_id or "")[:12]) if part)
    return f"{runner or '?'} ({where})" if where else str(runner)


def jobs_table(jobs: list[Json]) -> str:
    rows = [
        [
            job["id"],
            job["job_name"],
            job["owner"],
            job["status"],
            job["application"],
            job["environment"] or "any",
            local_time(job["date_created"]),
            ran_on(job),
        ]
        for job in jobs
    ]
    return table(["ID", "NAME", "OWNER", "STATUS", "APPLICATION", "ENV", "CREATED", "RAN ON"], rows)


def queue_overview(overview: Json) -> str:
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
            f"waiting {duration(oldest['age_seconds'])}"
        )
    else:
        parts.append("No job is waiting for a worker.")
    return "\n".join(parts)


def catalog_status(status: Json) -> str:
    lines = [
        f"file       {status['path']}",
        f"version    {status['version']}",
        f"loaded at  {local_time(status['loaded_at'])}",
    ]
    if status.get("last_error"):
        lines.append(
            f"last error {local_time(status.get('last_error_at'))} (the version above stays)"
        )
        lines.extend(f"  {line}" for line in str(status["last_error"]).splitlines())
    else:
        lines.append("last error none")
    return "\n".join(lines)


def audit_table(entries: list[Json]) -> str:
    rows = [
        [
            local_time(entry["at"]),
            entry["actor"],
            entry["action"],
            entry["target"],
            json.dumps(entry["details"], sort_keys=True) if entry["details"] else "",
        ]
        for entry in entries
    ]
    return table(["AT", "ACTOR", "ACTION", "TARGET", "DETAILS"], rows)


def _gpus(capacity: Json) -> str:
    """``1 A100 (ampere) 16.0 GiB``: free GPUs and what each is."""
    if not capacity["gpus"]:
        return "0"
    kind = " ".join(
        part
        for part in (capacity["gpu_model"], capacity["gpu_archi"] and f"({capacity['gpu_archi']})")
        if part
    )
    memory = human_bytes(capacity["gpu_mem"] * _MIB) if capacity["gpu_mem"] else ""
    return " ".join(part for part in (str(capacity["gpus"]), kind, memory) if part)


def workers_table(workers: list[Json], *, now: datetime) -> str:
    """One row per connected worker: what its last pull offered, beside the most it
    offered since it connected (free / most), and the jobs it holds."""
    rows = []
    for worker in workers:
        offered, peak = worker["offered"], worker["peak"]
        seen = datetime.fromisoformat(worker["last_seen_at"])
        rows.append(
            [
                worker["name"],
                worker["environment"],
                f"{duration(max(0.0, (now - seen).total_seconds()))} ago",
                f"{human_bytes(offered['memory'] * _MIB)} / {human_bytes(peak['memory'] * _MIB)}",
                f"{offered['cpu_cores']} / {peak['cpu_cores']}",
                f"{_gpus(offered)} / {peak['gpus']}",
                ", ".join(f"{job['id']} ({job['status']})" for job in worker["jobs"]) or "none",
            ]
        )
    return table(["WORKER", "ENV", "LAST SEEN", "MEMORY FREE/MOST", "CORES", "GPUS", "JOBS"], rows)
