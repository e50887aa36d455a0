"""End-to-end overhead of one trivial container job.

Starts the user API, the worker API (SQLite or a throwaway PostgreSQL database)
and one runner with its default settings, then, ``--jobs`` times in a row:

1. a bare ``docker run --rm`` of ``true`` in the demo image with the container
   settings a runner gives the job (``init``, ``--network none``, capabilities
   dropped, ``no-new-privileges``, its memory, CPU and PIDs limits, a job folder
   at ``/files``): the floor, what the engine itself needs for that container;
2. the same command as a LabCloud job (``testing/1.0/noop``): ``POST /jobs``, then
   ``GET /jobs/{id}`` until it is ``finished``.

The two alternate, and every other iteration runs the job first, so a change in
the machine's speed during the run weighs on both alike.

Prints, in milliseconds, p50/p95 of: the bare run; the job seen by the client
(POST to seeing ``finished``, which includes up to one poll interval); the job
seen by the user API (``date_finished - date_created``, no polling in it); and the
overhead, job minus the bare run of the same iteration. Also the two halves of a
job's time: until a runner leased it (``date_started``) and from there to the end.

    poetry run python bench/e2e_overhead.py [--jobs 50] [--db postgresql|sqlite]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path

from _support import (
    BACKENDS,
    RUNNER_DEFAULTS,
    ensure_image,
    job_container_run,
    job_payload,
    percentile,
    running_stack,
    summary,
)

TARGET_P50_MS = 250.0


def _seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def _bare_run(image: str) -> float:
    with tempfile.TemporaryDirectory(prefix="labcloud-bare-") as folder:
        command = job_container_run(image, "true", Path(folder))
        began = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        return (time.perf_counter() - began) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=50, help="measured jobs (default 50)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured jobs first")
    parser.add_argument("--db", choices=BACKENDS, default="postgresql")
    parser.add_argument("--poll", type=float, default=0.02, help="client poll interval, s")
    args = parser.parse_args()

    image = ensure_image()
    bare: list[float] = []
    client_side: list[float] = []
    server_side: list[float] = []
    overhead: list[float] = []
    to_lease: list[float] = []
    lease_to_end: list[float] = []
    with (
        running_stack(args.db, runners=1, runner_env=RUNNER_DEFAULTS) as stack,
        stack.user("bench@example.org") as client,
    ):
        # Let the runner authenticate and start its first long-poll.
        time.sleep(2)
        for index in range(args.warmup + args.jobs):
            job_first = index % 2 == 1
            if not job_first:
                bare_ms = _bare_run(image)
            began = time.perf_counter()
            response = client.post("/jobs", json=job_payload(f"noop-{index}"))
            response.raise_for_status()
            job_id = response.json()["id"]
            while True:
                job = client.get(f"/jobs/{job_id}").json()
                if job["status"] in ("finished", "error", "canceled"):
                    break
                time.sleep(args.poll)
            seen_ms = (time.perf_counter() - began) * 1000
            if job_first:
                bare_ms = _bare_run(image)
            if job["status"] != "finished":
                raise SystemExit(f"job {job_id} ended {job['status']}: {job}")
            if index < args.warmup:
                continue
            created, started, ended = (
                job["date_created"],
                job["date_started"],
                job["date_finished"],
            )
            bare.append(bare_ms)
            client_side.append(seen_ms)
            server_ms = _seconds_between(created, ended) * 1000
            server_side.append(server_ms)
            overhead.append(server_ms - bare_ms)
            to_lease.append(_seconds_between(created, started) * 1000)
            lease_to_end.append(_seconds_between(started, ended) * 1000)

    print(f"database: {args.db}; {args.jobs} jobs in sequence after {args.warmup} warm-up")
    print(summary("bare docker run --rm, the job's settings (CLI)", bare))
    print(summary(f"job, client: POST to finished (poll {args.poll * 1000:.0f} ms)", client_side))
    print(summary("job, user API: date_finished - date_created", server_side))
    print(summary("  of which created -> leased (date_started)", to_lease))
    print(summary("  of which leased -> finished", lease_to_end))
    print(summary("overhead: job (user API) - bare run", overhead))
    p50 = percentile(overhead, 50)
    verdict = "met" if p50 <= TARGET_P50_MS else "MISSED"
    p95 = percentile(overhead, 95)
    print(f"overhead p50 {p50:.1f} ms, p95 {p95:.1f} ms; target p50 <= 250 ms: {verdict}")
    client_overhead = [seen - run for seen, run in zip(client_side, bare, strict=True)]
    print(summary("overhead seen by the client: job (client) - bare", client_overhead))


if __name__ == "__main__":
    main()
