"""End-to-end throughput of trivial jobs with 4 runner slots, next to what the
Docker engine itself manages on this machine.

1. The engine alone: ``--containers`` runs of ``docker run --rm labcloud/demo:latest
   true`` from 4 threads at once; containers per second.
2. LabCloud: the user API and the worker API (a throwaway PostgreSQL database, or
   SQLite) and one runner with ``SLOTS=4`` and otherwise default settings;
   ``--jobs`` trivial jobs (``testing/1.0/noop``) are submitted at once and run to
   the end. Jobs per second from the first job's creation to the last one's end,
   by the user API's own timestamps; the same rate between the 10th and the
   10th-from-last job to end (steady state, without ramp-up and tail); and the
   most jobs that were leased at the same time.

    poetry run python bench/e2e_throughput.py [--jobs 100] [--containers 100] [--db postgresql]
"""

from __future__ import annotations

import argparse
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from _support import (
    BACKENDS,
    NO_JOB_LIMIT,
    RUNNER_DEFAULTS,
    ensure_image,
    job_payload,
    running_stack,
    wait_for,
)

SLOTS = 4


def _engine_rate(image: str, containers: int, threads: int) -> float:
    def run(_: int) -> None:
        subprocess.run(["docker", "run", "--rm", image, "true"], check=True, capture_output=True)

    began = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, range(containers)))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--containers", type=int, default=100)
    parser.add_argument("--db", choices=BACKENDS, default="postgresql")
    args = parser.parse_args()

    image = ensure_image()
    _engine_rate(image, SLOTS, SLOTS)  # warm-up
    engine_rate = _engine_rate(image, args.containers, SLOTS)
    print(
        f"Docker engine: {engine_rate:.2f} containers/s "
        f"({args.containers} x docker run --rm, {SLOTS} threads)",
        flush=True,
    )

    runner_env = {**RUNNER_DEFAULTS, "SLOTS": str(SLOTS)}
    with (
        running_stack(args.db, runners=1, user_env=NO_JOB_LIMIT, runner_env=runner_env) as stack,
        stack.user("bench@example.org") as client,
    ):
        time.sleep(2)  # the runner's slots start long-polling
        submitted_at = time.perf_counter()
        for index in range(args.jobs):
            client.post("/jobs", json=job_payload(f"noop-{index}")).raise_for_status()
        submitting = time.perf_counter() - submitted_at

        def ended() -> list[dict[str, Any]] | None:
            jobs: list[dict[str, Any]] = client.get("/jobs", params={"limit": 1000}).json()
            done = [job for job in jobs if job["status"] in ("finished", "error", "canceled")]
            return jobs if len(done) == args.jobs else None

        jobs: list[dict[str, Any]] = wait_for(ended, timeout=60 + args.jobs * 3, interval=0.5)
    failed = [job for job in jobs if job["status"] != "finished"]
    if failed:
        raise SystemExit(f"{len(failed)} job(s) did not finish, e.g. {failed[0]}")
    created = min(datetime.fromisoformat(job["date_created"]) for job in jobs)
    ends = sorted(datetime.fromisoformat(job["date_finished"]) for job in jobs)
    overall = args.jobs / (ends[-1] - created).total_seconds()
    edge = min(10, args.jobs // 4)
    steady = (len(ends) - 2 * edge - 1) / (ends[-edge - 1] - ends[edge]).total_seconds()
    print(
        f"LabCloud ({args.db}, 1 runner, SLOTS={SLOTS}): {args.jobs} trivial jobs, "
        f"{overall:.2f} jobs/s overall, {steady:.2f} jobs/s steady "
        f"(ends {edge + 1} to {len(ends) - edge}); at most {_most_at_once(jobs)} leased at once; "
        f"submitting took {submitting:.1f} s",
        flush=True,
    )
    print(
        f"ratio to the engine alone: {steady / engine_rate:.0%} (steady), "
        f"{overall / engine_rate:.0%} (overall)"
    )


if __name__ == "__main__":
    main()
