"""End-to-end throughput of trivial jobs with 4 runner slots, next to what the
Docker engine itself manages on this machine with the same container settings.

The user API and the worker API (a throwaway PostgreSQL database, or SQLite) and
one runner with ``SLOTS=4`` and otherwise default settings are started; then,
``--rounds`` times, alternately:

1. the engine alone: ``--containers`` runs of ``docker run --rm`` of ``true`` in
   the demo image from 4 threads at once, each with the settings the runner gives
   a job (``init``, ``--network none``, capabilities dropped, ``no-new-privileges``,
   a quarter of the memory, its CPU and PIDs limits, a job folder at ``/files``);
   containers per second;
2. LabCloud: ``--jobs`` trivial jobs (``testing/1.0/noop``) submitted at once and
   run to the end. Jobs per second from the first job's creation to the last
   one's end, by the user API's own timestamps; the same rate between the 10th and
   the 10th-from-last job to end (steady state, without ramp-up and tail); and the
   most jobs that were leased at the same time.

Each round's ratio is LabCloud's rate over the engine's in that round; the median
of the rounds is printed last.

    poetry run python bench/e2e_throughput.py [--jobs 100] [--containers 100] [--rounds 2]
                                              [--db postgresql]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from _support import (
    BACKENDS,
    NO_JOB_LIMIT,
    RUNNER_DEFAULTS,
    ensure_image,
    job_container_run,
    job_payload,
    running_stack,
    wait_for,
)

SLOTS = 4


def _engine_rate(image: str, containers: int, threads: int) -> float:
    with tempfile.TemporaryDirectory(prefix="labcloud-bare-") as scratch:
        folders = [Path(scratch) / str(index) for index in range(containers)]
        for folder in folders:
            folder.mkdir()
        commands = [job_container_run(image, "true", folder, slots=SLOTS) for folder in folders]

        def run(command: list[str]) -> None:
            subprocess.run(command, check=True, capture_output=True)

        began = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, commands))
        return containers / (time.perf_counter() - began)


def _most_at_once(jobs: list[dict[str, Any]]) -> int:
    """The most jobs leased (``date_started``) and not yet ended at one moment."""
    events = []
    for job in jobs:
        events.append((datetime.fromisoformat(job["date_started"]), 1))
        events.append((datetime.fromisoformat(job["date_finished"]), -1))
    current = most = 0
    for _, change in sorted(events):
        current += change
        most = max(most, current)
    return most


def _labcloud_round(client: httpx.Client, prefix: str, count: int) -> tuple[float, float, str]:
    """Submit ``count`` jobs at once and wait for them; (overall, steady, details)."""
    submitted_at = time.perf_counter()
    for index in range(count):
        client.post("/jobs", json=job_payload(f"{prefix}{index}")).raise_for_status()
    submitting = time.perf_counter() - submitted_at

    def ended() -> list[dict[str, Any]] | None:
        listed: list[dict[str, Any]] = client.get("/jobs", params={"limit": 1000}).json()
        ours = [job for job in listed if job["job_name"].startswith(prefix)]
        done = [job for job in ours if job["status"] in ("finished", "error", "canceled")]
        return ours if len(done) == count else None

    jobs: list[dict[str, Any]] = wait_for(ended, timeout=60 + count * 3, interval=0.5)
    failed = [job for job in jobs if job["status"] != "finished"]
    if failed:
        raise SystemExit(f"{len(failed)} job(s) did not finish, e.g. {failed[0]}")
    created = min(datetime.fromisoformat(job["date_created"]) for job in jobs)
    ends = sorted(datetime.fromisoformat(job["date_finished"]) for job in jobs)
    overall = count / (ends[-1] - created).total_seconds()
    edge = min(10, count // 4)
    steady = (len(ends) - 2 * edge - 1) / (ends[-edge - 1] - ends[edge]).total_seconds()
    details = (
        f"(ends {edge + 1} to {len(ends) - edge}); at most {_most_at_once(jobs)} leased at once; "
        f"submitting took {submitting:.1f} s"
    )
    return overall, steady, details


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--containers", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2, help="engine and LabCloud, alternated")
    parser.add_argument("--db", choices=BACKENDS, default="postgresql")
    args = parser.parse_args()
    if args.jobs > 1000:
        parser.error("--jobs: at most 1000 (one page of GET /jobs)")

    image = ensure_image()
    runner_env = {**RUNNER_DEFAULTS, "SLOTS": str(SLOTS)}
    steady_ratios: list[float] = []
    overall_ratios: list[float] = []
    with (
        running_stack(args.db, runners=1, user_env=NO_JOB_LIMIT, runner_env=runner_env) as stack,
        stack.user("bench@example.org") as client,
    ):
        time.sleep(2)  # the runner's slots start long-polling
        _engine_rate(image, SLOTS, SLOTS)  # warm-up
        for round_number in range(1, args.rounds + 1):
            engine_rate = _engine_rate(image, args.containers, SLOTS)
            print(
                f"round {round_number}: Docker engine: {engine_rate:.2f} containers/s "
                f"({args.containers} x docker run --rm with the jobs' settings, {SLOTS} threads)",
                flush=True,
            )
            overall, steady, details = _labcloud_round(client, f"noop-{round_number}-", args.jobs)
            print(
                f"round {round_number}: LabCloud ({args.db}, 1 runner, SLOTS={SLOTS}): "
                f"{args.jobs} trivial jobs, {overall:.2f} jobs/s overall, "
                f"{steady:.2f} jobs/s steady {details}",
                flush=True,
            )
            steady_ratios.append(steady / engine_rate)
            overall_ratios.append(overall / engine_rate)
            print(
                f"round {round_number}: ratio to the engine alone: {steady_ratios[-1]:.0%} "
                f"(steady), {overall_ratios[-1]:.0%} (overall)",
                flush=True,
            )
    print(
        f"median over {args.rounds} round(s): {statistics.median(steady_ratios):.0%} of the "
        f"engine (steady), {statistics.median(overall_ratios):.0%} (overall)"
    )


if __name__ == "__main__":
    main()
