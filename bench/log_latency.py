"""Live log latency and cost: how long a line written in a job's container takes to
reach a client following the job's log, and what a job writing a flood of log
costs the runner and the APIs.

Latency: a job prints ``--lines`` lines ``--interval`` seconds apart (the catalog's
``logs/1.0/ticker``, each with a progress line), then stays quiet a few seconds.
A client follows ``GET /jobs/{id}/logs?follow=true`` from before the job starts
and notes when each line arrives. Before the job ends the Docker engine's own
timestamps of the container's output (``docker logs --timestamps``: when the
engine read each line from the container) are read; a line's latency is its
arrival at the client minus that timestamp (one clock: all on this host). The
path: engine → runner (``stream_logs``) → worker API (``POST /jobs/{q}/log``,
at most one request per 0.2 s per job) → user API (its follow long-polls the
worker API, woken when a chunk lands) → client.

Cost: a job writes ``--rate-kib`` KiB of log per second for ``--seconds`` seconds
(``logs/1.0/steady``) while a client follows its log; the CPU seconds per second
of the runner (its process and threads), the worker API and the user API during
the run are read from ``/proc``, with the default live log bound
(LIVE_LOG_MAX_BYTES, 4 MiB: the flood is cut after the first bytes) and with a
bound too large to reach (every byte the runner can ship goes through the APIs),
beside a quiet job of the same length (what a running job costs anyway).

Runner settings are the defaults (``RUNNER_DEFAULTS``).

    poetry run python bench/log_latency.py [--lines 100] [--interval 0.1]
        [--rate-kib 10240] [--seconds 10] [--db sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import secrets
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import httpx
from _procstat import cpu_seconds, descendants
from _support import (
    NO_JOB_LIMIT,
    REPO_ROOT,
    RUNNER_DEFAULTS,
    Stack,
    database_urls,
    ensure_image,
    percentile,
    wait_for,
)

CATALOG = REPO_ROOT / "tests" / "e2e" / "live_logs_catalog.yaml"
EMAIL = "bench-logs@example.org"


def _submit(client: httpx.Client, entrypoint: str, **env: str) -> int:
    response = client.post(
        "/jobs",
        json={
            "job_name": f"{entrypoint}-{secrets.token_hex(3)}",
            "application": {"application": "logs", "version": "1.0", "entrypoint": entrypoint},
            "attributes": {"env_vars": env},
        },
    )
    response.raise_for_status()
    job_id: int = response.json()["id"]
    return job_id


def _ended(client: httpx.Client, job_id: int) -> None:
    wait_for(
        lambda: client.get(f"/jobs/{job_id}").json()["status"] in {"finished", "error"},
        timeout=300,
        interval=0.2,
        what=f"job {job_id} to end",
    )


def _engine_time(stamp: str) -> float:
    """Seconds since the epoch of an RFC 3339 timestamp with nanoseconds."""
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(whole + "+00:00").timestamp() + float(f"0.{fraction or 0}")


def latency(stack: Stack, client: httpx.Client, lines: int, interval: float) -> list[float]:
    """Milliseconds from each line's write in the container to its arrival."""
    job_id = _submit(client, "ticker", TICKS=str(lines), TICK_SECONDS=str(interval), LINGER="5")
    arrivals: dict[str, float] = {}
    engine: dict[str, float] = {}

    def read_engine_stamps() -> None:
        # While the container lingers: the engine's timestamps of its lines.
        engine_client = docker.from_env()
        container = wait_for(
            lambda: engine_client.containers.list(filters={"label": f"labcloud.job_id={job_id}"}),
            timeout=120,
        )[0]
        wait_for(lambda: len(arrivals) >= lines, timeout=120, interval=0.05)
        for raw in container.logs(timestamps=True).decode().splitlines():
            stamp, _, text = raw.partition(" ")
            if text.startswith("tick-"):
                engine[text] = _engine_time(stamp)

    reader = threading.Thread(target=read_engine_stamps, daemon=True)
    reader.start()
    with client.stream(
        "GET", f"/jobs/{job_id}/logs", params={"follow": "true"}, timeout=120
    ) as stream:
        for line in stream.iter_lines():
            if line.startswith("tick-"):
                arrivals[line] = time.time()
    reader.join(timeout=60)
    _ended(client, job_id)
    return [(arrivals[name] - engine[name]) * 1000 for name in arrivals if name in engine]


def _cpu(pids: dict[str, list[int]]) -> dict[str, float]:
    return {name: sum(cpu_seconds(pid) for pid in group) for name, group in pids.items()}


def cost(
    stack: Stack, client: httpx.Client, entrypoint: str, seconds: int, **env: str
) -> dict[str, float]:
    """CPU seconds per second of the runner and both APIs while one job runs (with
    a client following its log)."""
    pids = {
        "runner": descendants(stack.runners[0].pid),
        "worker API": descendants(stack.worker_api.pid),
        "user API": descendants(stack.user_api.pid),
    }
    job_id = _submit(client, entrypoint, **env)
    wait_for(lambda: client.get(f"/jobs/{job_id}").json()["status"] == "running", timeout=120)
    before, began = _cpu(pids), time.monotonic()
    received = 0
    with client.stream(
        "GET", f"/jobs/{job_id}/logs", params={"follow": "true"}, timeout=seconds + 120
    ) as stream:
        for piece in stream.iter_bytes():
            received += len(piece)
    after, elapsed = _cpu(pids), time.monotonic() - began
    _ended(client, job_id)
    usage = {name: (after[name] - before[name]) / elapsed for name in pids}
    usage["followed MiB"] = received / 2**20
    return usage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=100)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--rate-kib", type=int, default=10240)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    args = parser.parse_args()
    ensure_image()

    for bound, label in ((None, "default bound (4 MiB)"), (str(2**30), "bound 1 GiB")):
        with (
            tempfile.TemporaryDirectory(prefix="labcloud-bench-") as folder,
            database_urls(args.db, "user_db", "queue_db") as urls,
        ):
            stack = Stack(Path(folder), CATALOG, **urls)
            stack.user_api.env.update(NO_JOB_LIMIT)
            stack.runner_env.update(RUNNER_DEFAULTS)
            if bound is not None:
                stack.worker_api.env["LIVE_LOG_MAX_BYTES"] = bound
            try:
                stack.start(runners=1)
                with stack.user(EMAIL) as client:
                    if bound is None:
                        values = latency(stack, client, args.lines, args.interval)
                        print(
                            f"latency over {len(values)} lines ({args.db}): "
                            f"p50 {percentile(values, 50):.0f} ms, "
                            f"p95 {percentile(values, 95):.0f} ms, "
                            f"max {max(values):.0f} ms"
                        )
                        quiet = cost(
                            stack,
                            client,
                            "ticker",
                            args.seconds,
                            TICKS="1",
                            TICK_SECONDS="0",
                            LINGER=str(args.seconds),
                        )
                        print(f"quiet job, {args.seconds} s: {_format(quiet)}")
                    flood = cost(
                        stack,
                        client,
                        "steady",
                        args.seconds,
                        RATE_KB=str(args.rate_kib),
                        SECONDS_TOTAL=str(args.seconds),
                    )
                    print(
                        f"{args.rate_kib / 1024:g} MiB/s of log for {args.seconds} s, "
                        f"{label}: {_format(flood)}"
                    )
            except BaseException:
                print(stack.logs())
                raise
            finally:
                stack.stop()


def _format(usage: dict[str, Any]) -> str:
    return ", ".join(
        f"{name} {value:.2f}" + ("" if name.endswith("MiB") else " CPU s/s")
        for name, value in usage.items()
    )


if __name__ == "__main__":
    main()
