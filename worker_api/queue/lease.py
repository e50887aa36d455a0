"""The pull's SQL: which queued jobs a worker's offer leases, in one statement.

The lease is a status change like any other (``queued`` -> ``pulled``), applied by
``worker_api.queue.lifecycle.transition`` to the candidates chosen here.

PostgreSQL locks candidate rows with ``FOR UPDATE SKIP LOCKED`` so that concurrent
pulls take different jobs; on SQLite every transaction starts with ``BEGIN
IMMEDIATE`` (``labcloud.db``), so the same statement runs alone under the write lock.

How a pull stays cheap however long the queue gets. A worker takes jobs of its own
environment, or jobs for "anywhere" once they are ``older_than`` seconds old. One
``WHERE environment = :env OR environment IS NULL`` cannot follow any index order,
so PostgreSQL would collect every queued match and sort it. The pull instead reads
two candidate lists, one per branch of the OR, each a walk of the partial index
``ix_queued_jobs_pull`` (queued rows only, ordered ``environment, priority DESC,
created_at, id``) that stops after ``limit`` matches, and leases the best
``limit`` of the two. ``environment`` leads the ORDER BY of each branch (a constant
there) because PostgreSQL treats ``IS NULL`` as no equality and would otherwise not
see that the index is already in ``priority, created_at, id`` order. ``status =
'queued'`` is written as a literal: a query with a bound parameter cannot prove the
partial index's predicate once psycopg's prepared statements switch to generic plans.

Plans seen with ``EXPLAIN (ANALYZE)`` on PostgreSQL 15 (2 cores), the lease of one
job, 300,000 finished/failed/cancelled rows and 2,000 running ones beside the queued
rows (a third each ``local``, ``cloud`` and "anywhere", priorities 0-5, a mix of
memory and GPU needs):

- the 0001 schema (index ``status, environment, priority DESC, created_at``, one OR
  query), 100,000 queued: BitmapOr of both branches, 41,558 rows fetched and
  sorted, 67 ms;
- this schema, 10 or 100,000 queued: the same plan, two Index Scans on
  ``ix_queued_jobs_pull`` under LockRows/Limit, each stopping at its first match,
  then a sort of the two candidates: 0.2-0.3 ms warm (up to 1 ms cold) at either
  depth; the whole lease seen from Python (BEGIN, statement, rows back) has a p50
  of 2-3 ms at both depths. On SQLite the plan is the same (two SEARCHes of
  ``ix_queued_jobs_pull``, a temporary B-tree only for the final few rows): 1 ms;
- the reaper and a worker's held jobs read their own indexes (see
  ``worker_api.queue.repository``).

A pull that offers no GPU reads ``ix_queued_jobs_pull_no_gpu`` instead, the same
line without the jobs that need a GPU: GPU jobs waiting for a GPU worker cost a
CPU worker nothing.

Both pull indexes carry the jobs' requirements (``cpu_cores, memory, gpu_mem,
gpus``; 0 when a job asks for nothing) after the order columns, and the pull
compares them with a plain ``<=``: PostgreSQL checks them on the index entries
(``Index Cond``) and reads a table row only for a job that fits.

What a pull still pays for: queued jobs ahead in line that this worker cannot run
are still passed one by one, on the index entries for the requirements above, on
the table rows for a GPU model or architecture it lacks or RETRY_DIFFERENT. A
worker behind 100,000 jobs that all need more memory than it has walks 100,000
index entries: 14-19 ms on PostgreSQL (36 ms when the rows had to be read), 20-24
ms on SQLite (53 ms). A cost in the depth of what the worker cannot take, never in
the finished history.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import (
    ColumnElement,
    Integer,
    Select,
    SQLColumnExpression,
    String,
    bindparam,
    literal_column,
    not_,
    or_,
    select,
    union_all,
)
from sqlalchemy.orm import Session

from labcloud.contract import JobStatus
from worker_api.models import QueuedJob
from worker_api.queue.lifecycle import Cause, Selection, transition
from worker_api.queue.repository import list_contains
from worker_api.queue.schemas import WorkerOffer

# The partial pull index's predicate, as a literal (see the module docstring).
_QUEUED: ColumnElement[str] = literal_column(f"'{JobStatus.QUEUED.value}'")
_NO_GPU: ColumnElement[int] = literal_column("0")


def lease(
    session: Session,
    offer: WorkerOffer,
    *,
    limit: int,
    older_than: float,
    retry_different: bool,
    now: datetime,
    lease_until: datetime,
) -> list[QueuedJob]:
    """Lease up to ``limit`` matching queued jobs to ``offer.name`` in one statement;
    the jobs come back in pull order (priority, then age).

    Each branch of the environment rule locks its own ``limit`` best candidates
    (see the module docstring); those not leased stay locked only until the
    transaction ends, a few milliseconds."""
    dialect = session.get_bind().dialect.name
    shape = _LeaseShape(
        retry_different=retry_different,
        gpu_model=offer.gpu_model is not None,
        gpu_archi=offer.gpu_archi is not None,
        no_gpu=offer.gpus == 0,
    )
    candidates = Selection(
        shape=("lease", shape),
        build=lambda: _candidates(dialect, shape),
        parameters={
            "offer_environment": offer.environment.value,
            "offer_created_before": now - timedelta(seconds=older_than),
            "offer_cpu_cores": offer.cpu_cores,
            "offer_memory": offer.memory,
            "offer_gpus": offer.gpus,
            "offer_gpu_mem": offer.gpu_mem,
            "offer_gpu_model": offer.gpu_model,
            "offer_gpu_archi": offer.gpu_archi,
            "offer_worker": offer.name,
            "offer_limit": limit,
        },
    )
    leased = transition(
        session,
        candidates,
        JobStatus.PULLED,
        cause=Cause.LEASE,
        now=now,
        worker=offer.name,
        lease_until=lease_until,
    )
    leased.sort(key=lambda row: (-row.priority, row.created_at, row.id))
    return leased


@dataclass(frozen=True, slots=True)
class _LeaseShape:
    """What changes the text of a lease statement, beyond its parameters."""

    retry_different: bool
    gpu_model: bool
    gpu_archi: bool
    no_gpu: bool


def _candidates(dialect: str, shape: _LeaseShape) -> Select[tuple[int]]:
    """The queue ids a pull of this shape leases, with bound parameters for the
    offer. Built once per shape and process (by ``transition``)."""
    job = QueuedJob
    limit = bindparam("offer_limit", type_=Integer())
    fits: list[ColumnElement[bool]] = [
        # Plain comparisons (a job that asks for nothing says 0): the pull index
        # carries these columns and checks them on its entries.
        job.cpu_cores <= bindparam("offer_cpu_cores"),
        job.memory <= bindparam("offer_memory"),
        # gpus counts every job that needs a GPU, so a worker without a free GPU
        # (gpus=0) is never given one, whatever gpu_mem it reports. For such a pull
        # the condition is written as the literal of the partial index
        # ix_queued_jobs_pull_no_gpu, which the planner can then use.
        job.gpus == _NO_GPU if shape.no_gpu else job.gpus <= bindparam("offer_gpus"),
        job.gpu_mem <= bindparam("offer_gpu_mem"),
        _null_or_equal(job.gpu_model, "offer_gpu_model", offered=shape.gpu_model),
        _null_or_equal(job.gpu_archi, "offer_gpu_archi", offered=shape.gpu_archi),
    ]
    if shape.retry_different:
        worker = bindparam("offer_worker", type_=String())
        fits.append(not_(list_contains(dialect, job.failed_workers, worker)))
    branches: list[tuple[ColumnElement[bool], ...]] = [
        (job.environment == bindparam("offer_environment"),),
        # A job for "anywhere" goes to any worker, but only once it has waited
        # older_than seconds for a worker of a preferred kind.
        (job.environment.is_(None), job.created_at <= bindparam("offer_created_before")),
    ]
    candidates = [
        select(job.id, job.priority, job.created_at)
        .where(job.status == _QUEUED, *where, *fits)
        .order_by(job.environment, job.priority.desc(), job.created_at, job.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte(f"lease_candidates_{index}")
        for index, where in enumerate(branches)
    ]
    pool = union_all(*(select(candidate) for candidate in candidates)).subquery("pool")
    return (
        select(pool.c.id)
        .order_by(pool.c.priority.desc(), pool.c.created_at, pool.c.id)
        .limit(limit)
    )


def _null_or_equal(
    column: SQLColumnExpression[str | None], parameter: str, *, offered: bool
) -> ColumnElement[bool]:
    """The job asks for nothing, or for what the worker offers (if it says)."""
    if not offered:
        return column.is_(None)
    return or_(column.is_(None), column == bindparam(parameter, type_=String()))
