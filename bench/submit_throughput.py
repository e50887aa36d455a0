"""Submission throughput: ``POST /jobs`` per second with 16 concurrent clients.

Starts the user API and the worker API on throwaway PostgreSQL databases (no
runner: submitted jobs stay queued), signs up one user per client, then serves
the user API as ``python -m user_api --workers N`` (production settings: INFO
logs, access log on, local auth, local storage) and lets ``--clients``
asyncio clients (one keep-alive connection each) submit trivial jobs
(``testing/1.0/noop``) back to back for ``--seconds`` after a warm-up.

The clients share the machine with the servers, so they should cost little: by
default they use aiohttp (its HTTP parser is C; about 0.5 ms of CPU per request
here), ``--client httpx`` the pure-Python client of the first measurements
(about 1.8 ms, a third of the user API's own cost per request).

Prints per worker count: accepted submissions per second, the latency of one
``POST /jobs`` (p50/p95), refusals, how the clients' connections were spread over
the user API's processes, how long the user API's outbox then needed to
hand every job to the worker API, and the CPU seconds each party used (client,
user API, worker API, PostgreSQL) over the measured window.

    poetry run python bench/submit_throughput.py [--workers 1 2] [--clients 16]
        [--seconds 20] [--client aiohttp|httpx]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
from _procstat import connections, cpu_seconds, descendants, named
from _support import (
    NO_JOB_LIMIT,
    Stack,
    job_payload,
    machine_speed,
    percentile,
    running_stack,
    wait_for,
)
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

TARGET_PER_SECOND = 200.0


def _serve_with_workers(stack: Stack, workers: int) -> None:
    """Restart the user API as ``python -m user_api --workers N`` (INFO logs,
    access log on: its production logging)."""
    port = str(stack.user_port)
    stack.user_api.args = ["user_api", "--host", "127.0.0.1", "--port", port]
    stack.user_api.args += ["--workers", str(workers)]
    stack.restart(stack.user_api)


class _Tally:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.refused: dict[int, int] = {}
        self.measuring = False

    def record(self, status: int, began: float) -> None:
        """One answer to a request sent at ``began`` (``perf_counter``)."""
        elapsed = (time.perf_counter() - began) * 1000
        if not self.measuring:
            return
        if status == 201:
            self.latencies.append(elapsed)
        else:
            self.refused[status] = self.refused.get(status, 0) + 1


async def _httpx_client(
    index: int, token: dict[str, str], base_url: str, tally: _Tally, stop_at: float
) -> None:
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(
        base_url=base_url, headers=token, limits=limits, timeout=30
    ) as client:
        sequence = 0
        while time.monotonic() < stop_at:
            sequence += 1
            began = time.perf_counter()
            response = await client.post("/jobs", json=job_payload(f"c{index}-{sequence}"))
            tally.record(response.status_code, began)


async def _aiohttp_client(
    index: int, token: dict[str, str], base_url: str, tally: _Tally, stop_at: float
) -> None:
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=1)  # one keep-alive connection
    async with aiohttp.ClientSession(
        base_url=base_url, headers=token, connector=connector, timeout=timeout
    ) as client:
        sequence = 0
        while time.monotonic() < stop_at:
            sequence += 1
            began = time.perf_counter()
            payload = job_payload(f"c{index}-{sequence}")
            async with client.post("/jobs", json=payload) as response:
                await response.read()
            tally.record(response.status, began)


Client = Callable[[int, dict[str, str], str, _Tally, float], Coroutine[Any, Any, None]]
_CLIENTS: dict[str, Client] = {"aiohttp": _aiohttp_client, "httpx": _httpx_client}


@dataclass
class Snapshot:
    servers: dict[str, dict[int, float]]  # CPU seconds so far per process, per party
    client: float  # CPU seconds of this process
    spread: list[int]  # connections to the user API held by each of its processes


async def _load(
    client: Client,
    tokens: list[dict[str, str]],
    base_url: str,
    warmup: float,
    seconds: float,
    snapshot: Callable[[], Snapshot],
) -> tuple[_Tally, float, Snapshot, Snapshot]:
    """Run the clients; CPU snapshots are taken when the measured window opens
    and closes."""
    tally = _Tally()
    stop_at = time.monotonic() + warmup + seconds
    tasks = [
        asyncio.create_task(client(index, token, base_url, tally, stop_at))
        for index, token in enumerate(tokens)
    ]
    await asyncio.sleep(warmup)
    tally.measuring = True
    before = snapshot()
    began = time.monotonic()
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - began
    return tally, elapsed, before, snapshot()


def _pending_outbox(user_db: str) -> int:
    engine = create_engine(user_db, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return int(connection.execute(text("SELECT count(*) FROM worker_outbox")).scalar_one())
    finally:
        engine.dispose()


def _snapshot(stack: Stack) -> Snapshot:
    user_api = descendants(stack.user_api.pid)
    held = connections(user_api, stack.user_port)
    if len(held) > 1:  # the supervisor listens but leaves accepting to the others
        held.pop(stack.user_api.pid, None)
    groups = {
        "user API": user_api,
        "worker API": descendants(stack.worker_api.pid),
        "PostgreSQL": named("postgres"),
    }
    usage = resource.getrusage(resource.RUSAGE_SELF)
    servers = {name: {pid: cpu_seconds(pid) for pid in pids} for name, pids in groups.items()}
    spread = sorted(held.values(), reverse=True)
    return Snapshot(servers, usage.ru_utime + usage.ru_stime, spread)


def _cpu_used(before: Snapshot, after: Snapshot) -> str:
    parts = [f"client {after.client - before.client:.1f} s"]
    for name, now in after.servers.items():
        used = sum(seconds - before.servers[name].get(pid, 0.0) for pid, seconds in now.items())
        parts.append(f"{name} {used:.1f} s")
    return ", ".join(parts)


def _run(
    client: Client, workers: int, clients: int, warmup: float, seconds: float
) -> dict[str, Any]:
    with running_stack("postgresql", user_env=NO_JOB_LIMIT) as stack:
        tokens = []
        for index in range(clients):
            stack.user(f"client-{index}@example.org").close()
            tokens.append(stack.token(f"client-{index}@example.org"))
        _serve_with_workers(stack, workers)
        tally, elapsed, before, after = asyncio.run(
            _load(client, tokens, stack.user_url, warmup, seconds, lambda: _snapshot(stack))
        )
        drained_at = time.monotonic()
        backlog = _pending_outbox(stack.user_db)
        wait_for(lambda: _pending_outbox(stack.user_db) == 0, timeout=600, interval=0.5)
        drain = time.monotonic() - drained_at
    return {
        "workers": workers,
        "rate": len(tally.latencies) / elapsed,
        "accepted": len(tally.latencies),
        "elapsed": elapsed,
        "p50": percentile(tally.latencies, 50),
        "p95": percentile(tally.latencies, 95),
        "refused": tally.refused,
        "backlog": backlog,
        "drain": drain,
        "cpu": _cpu_used(before, after),
        "spread": "/".join(str(count) for count in before.spread),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument(
        "--client",
        choices=sorted(_CLIENTS),
        default="aiohttp",
        help="HTTP client of the load generator (httpx: the first rounds' client)",
    )
    args = parser.parse_args()
    print(f"machine: fixed loop in {machine_speed():.2f} s (lower is faster)", flush=True)
    for workers in args.workers:
        result = _run(_CLIENTS[args.client], workers, args.clients, args.warmup, args.seconds)
        verdict = "met" if result["rate"] >= TARGET_PER_SECOND else "MISSED"
        print(
            f"user API uvicorn workers={workers}, {args.clients} {args.client} clients: "
            f"{result['rate']:.1f} POST /jobs per s ({result['accepted']} in "
            f"{result['elapsed']:.1f} s; target >= 200/s: {verdict}); "
            f"latency p50={result['p50']:.1f} ms p95={result['p95']:.1f} ms; "
            f"refused {result['refused'] or 'none'}; connections per process "
            f"{result['spread']}",
            flush=True,
        )
        print(
            f"  outbox after the run: {result['backlog']} job(s) not yet forwarded, "
            f"drained in {result['drain']:.1f} s; CPU used while measured: {result['cpu']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
