"""Lease latency: how long one pull that leases one job takes, by queue depth.

For each database (a throwaway PostgreSQL database and a SQLite file) the worker
API is started on it (it migrates the schema, so the measured indexes are the
migrations' own), one job is enqueued through ``service.enqueue`` and the
queue is filled with copies of that row by ``INSERT ... SELECT`` (every column
the migrations created, so the rows are what enqueue writes) up to each depth.
At each depth, ``--leases`` times:

- repository level: ``service.lease_jobs(limit=1)`` in its own transaction,
  commit included, in this process;
- HTTP: ``GET /jobs?limit=1`` on the running worker API with a worker's token
  (uvicorn, keep-alive connection, no long-poll).

After each lease the job is put back (untimed), so the depth stays the same and
every pull leases the head of the queue. The status change a lease writes
(``pulled``, a ``status_outbox`` row) is left to the worker API, which forwards it
to the user API while the next pulls run, as in service: that work is part of
what a lease costs. (The user API answers 404 for these jobs, which exist only in
the queue, and the worker API takes that as delivered.) After each measurement
the benchmark waits, untimed, until the outbox is empty, so one measurement's
backlog does not weigh on the next. All jobs match the pulling worker, except
in the last two measurements ("100,000 ahead ..."), where every job but the newest
needs a GPU the worker does not have, then more memory than it has: a pull must
get past all of them.

    poetry run python bench/lease_latency.py [--leases 200] [--db postgresql sqlite]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from datetime import UTC, datetime

import httpx
from _support import BACKENDS, Stack, percentile, running_stack, summary, wait_for
from sqlalchemy import Engine, inspect, text

from labcloud.contract import (
    AppSpec,
    Environment,
    HandlerSpec,
    HardwareSpec,
    JobSpecs,
    MetaSpec,
    PathsUpload,
    QueueJob,
)
from labcloud.db import create_db_engine, make_session_factory, unit_of_work
from worker_api.queue import service
from worker_api.queue.policy import QueuePolicy, QueueSignals
from worker_api.queue.schemas import WorkerOffer

DEPTHS = (10, 10_000, 100_000)
TEMPLATE_JOB_ID = 1_000_000_000
WORKER_MEMORY = 16_000
TOO_MUCH_MEMORY = 10_000_000
TARGET_P50_MS = 10.0


def _template_job() -> QueueJob:
    return QueueJob(
        job=JobSpecs(
            app=AppSpec(cmd=["true"]),
            handler=HandlerSpec(image_url="labcloud/demo:latest", entrypoint="noop"),
            meta=MetaSpec(job_id=TEMPLATE_JOB_ID, date_created=datetime.now(UTC)),
            hardware=HardwareSpec(cpu_cores=1, memory=64),
            timeout=600,
        ),
        paths_upload=PathsUpload(
            output="bench/output/noop", log="bench/log/noop", artifact="bench/artifact/noop"
        ),
    )


def _fill(engine: Engine, first: int, last: int) -> None:
    """Copies ``first``..``last`` of the template row, each a second older than the
    one before (so the copies are ahead of the template in the queue)."""
    columns = [
        column["name"]
        for column in inspect(engine).get_columns("queued_jobs")
        if column["name"] not in ("id", "job_id", "created_at", "updated_at")
    ]
    names = ", ".join(columns)
    copied = ", ".join(f"t.{name}" for name in columns)
    if engine.dialect.name == "postgresql":
        older = "t.created_at - g.n * interval '1 second'"
        statement = (
            f"INSERT INTO queued_jobs ({names}, job_id, created_at, updated_at) "
            f"SELECT {copied}, g.n, {older}, {older} "
            "FROM queued_jobs t, "
            "generate_series(CAST(:first AS integer), CAST(:last AS integer)) AS g(n) "
            "WHERE t.job_id = :template"
        )
    else:
        older = "strftime('%Y-%m-%d %H:%M:%S', t.created_at, '-' || g.n || ' seconds') || '.000000'"
        statement = (
            "WITH RECURSIVE g(n) AS (SELECT :first UNION ALL SELECT n + 1 FROM g "
            "WHERE n < :last) "
            f"INSERT INTO queued_jobs ({names}, job_id, created_at, updated_at) "
            f"SELECT {copied}, g.n, {older}, {older} FROM queued_jobs t, g "
            "WHERE t.job_id = :template"
        )
    with engine.begin() as connection:
        connection.execute(
            text(statement), {"first": first, "last": last, "template": TEMPLATE_JOB_ID}
        )
        if engine.dialect.name == "postgresql":
            connection.execute(text("ANALYZE queued_jobs"))
        else:
            connection.execute(text("ANALYZE"))


def _settle(engine: Engine) -> None:
    """Statistics after a mass update, and on PostgreSQL the old row versions
    removed: rows are queued once with their requirements and never rewritten, so
    the index entries that the benchmark's UPDATE left behind would be measured,
    not the queue (autovacuum removes them in a running service)."""
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("VACUUM ANALYZE queued_jobs"))
    else:
        with engine.begin() as connection:
            connection.execute(text("ANALYZE"))


def _put_back(engine: Engine, queue_id: int) -> None:
    with engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE queued_jobs SET status = 'queued', worker = NULL, "
                "lease_expires_at = NULL, attempts = 0 WHERE id = :id"
            ),
            {"id": queue_id},
        )


def _outbox_empty(engine: Engine) -> bool:
    with engine.connect() as connection:
        return not connection.execute(text("SELECT count(*) FROM status_outbox")).scalar_one()


def _measure(count: int, lease: Callable[[], int], engine: Engine) -> list[float]:
    """Time ``count`` leases (ms); each leased job is put back untimed, its status
    change forwarded by the worker API meanwhile."""
    timings: list[float] = []
    for _ in range(count + 5):
        began = time.perf_counter()
        queue_id = lease()
        timings.append((time.perf_counter() - began) * 1000)
        _put_back(engine, queue_id)
    wait_for(
        lambda: _outbox_empty(engine),
        timeout=120 + count,
        interval=0.1,
        what="the worker API to forward the leases' status changes",
    )
    return timings[5:]  # the first pulls warm caches and connections


def _bench_backend(backend: str, leases: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    with running_stack(backend) as stack:
        engine = create_db_engine(stack.queue_db)
        factory = make_session_factory(engine)
        policy = QueuePolicy()
        with unit_of_work(factory) as session:
            service.enqueue(session, _template_job(), signals=QueueSignals())
        offer = WorkerOffer(
            name="bench-worker",
            environment=Environment.LOCAL,
            memory=WORKER_MEMORY,
            cpu_cores=2,
        )

        def repository_lease() -> int:
            with unit_of_work(factory) as session:
                leased = service.lease_jobs(session, offer, policy=policy, limit=1, older_than=0)
            assert len(leased) == 1, "the queue is never empty"
            return leased[0].queue_id

        worker = http_worker(stack)

        def http_lease() -> int:
            response = worker.get(
                "/jobs", params={"memory": WORKER_MEMORY, "cpu_cores": 2, "limit": 1}
            )
            response.raise_for_status()
            leased = response.json()
            assert len(leased) == 1, leased
            return int(next(iter(leased)))

        try:
            filled = 1
            for depth in DEPTHS:
                _fill(engine, filled, depth - 1)
                filled = depth
                label = f"{backend} depth {depth:,}"
                results[f"{label}, repository"] = _measure(leases, repository_lease, engine)
                results[f"{label}, HTTP GET /jobs"] = _measure(leases, http_lease, engine)
            columns = {column["name"] for column in inspect(engine).get_columns("queued_jobs")}
            needs_gpu = "gpu_mem = 8000" + (", gpus = 1" if "gpus" in columns else "")
            no_gpu = "gpu_mem = 0" + (", gpus = 0" if "gpus" in columns else "")
            for what, change in (
                ("need a GPU (the worker has none)", needs_gpu),
                ("need more memory than the worker has", f"{no_gpu}, memory = {TOO_MUCH_MEMORY}"),
            ):
                with engine.begin() as connection:
                    connection.execute(
                        text(f"UPDATE queued_jobs SET {change} WHERE job_id <> :template"),
                        {"template": TEMPLATE_JOB_ID},
                    )
                _settle(engine)
                label = f"{backend} {DEPTHS[-1]:,} ahead {what}"
                results[f"{label}, repository"] = _measure(leases, repository_lease, engine)
                results[f"{label}, HTTP GET /jobs"] = _measure(leases, http_lease, engine)
        finally:
            worker.close()
            engine.dispose()
    return results


def http_worker(stack: Stack) -> httpx.Client:
    """An HTTP client of the worker API holding a worker account's token."""
    account = "bench-worker@example.org"
    stack.add_worker_account(account)
    return httpx.Client(base_url=stack.worker_url, headers=stack.token(account), timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--leases", type=int, default=200, help="leases per measurement")
    parser.add_argument("--db", choices=BACKENDS, nargs="+", default=list(BACKENDS))
    args = parser.parse_args()
    for backend in args.db:
        results = _bench_backend(backend, args.leases)
        for label, timings in results.items():
            print(summary(label, timings, width=66), flush=True)
        if backend == "postgresql":
            for level in ("repository", "HTTP GET /jobs"):
                p50 = percentile(results[f"postgresql depth {DEPTHS[-1]:,}, {level}"], 50)
                verdict = "met" if p50 < TARGET_P50_MS else "MISSED"
                print(f"target p50 < 10 ms at 100,000 on PostgreSQL ({level}): {verdict}")


if __name__ == "__main__":
    main()
