"""The queue's tables: the jobs themselves and the status changes not yet
acknowledged by the user API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from labcloud.contract import JobStatus
from labcloud.db import UtcDateTime

# Named constraints and indexes, so that migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

STATUS_LENGTH = 16
_STATUS_VALUES = ", ".join(f"'{status.value}'" for status in JobStatus)
# The same text is written in the initial migration; a new status needs a migration.
STATUS_CHECK = f"status IN ({_STATUS_VALUES})"
# Predicates of the partial indexes (also written out in migration 0002). A query
# can use such an index only when its WHERE clause implies the predicate with
# literal values, so the pull writes ``status = 'queued'`` as a literal too.
QUEUED_ONLY = f"status = '{JobStatus.QUEUED.value}'"
LEASED_ONLY = "lease_expires_at IS NOT NULL"
QUEUED_NO_GPU = f"{QUEUED_ONLY} AND gpus = 0"
# Key columns after the pull order: a pull's ``<=`` on each is checked on the index
# entries, so jobs ahead that need more than the worker offers cost no table read.
PULL_REQUIREMENTS = ("cpu_cores", "memory", "gpu_mem", "gpus")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class StatusType(TypeDecorator[JobStatus]):
    """A ``JobStatus`` stored as its string value (readable in SQL, checked by a
    constraint), instead of a database enum that needs DDL for every new status."""

    impl = String(STATUS_LENGTH)
    cache_ok = True

    def process_bind_param(self, value: JobStatus | str | None, dialect: Dialect) -> str | None:
        return None if value is None else JobStatus(value).value

    def process_result_value(self, value: str | None, dialect: Dialect) -> JobStatus | None:
        return None if value is None else JobStatus(value)


class QueuedJob(Base):
    """One job in the queue. ``id`` is the queue id workers see; ``job_id`` the user
    API's id. The hardware columns copy ``spec.hardware`` so pulls can match in SQL;
    ``gpus`` is the number of GPUs the job needs
    (``worker_api.queue.repository.gpus_needed``).

    ``log_upload_until`` is set when a running job is cancelled with its outputs
    kept: until then its last worker may still upload the job's log.

    Indexes (see ``worker_api.queue.lease`` for the plans they give):
    ``ix_queued_jobs_pull`` holds only queued rows, in pull order per environment,
    so a pull reads the head of the line however many finished jobs accumulate,
    and their hardware requirements, so that it passes over jobs needing more than
    the worker offers without reading their rows;
    ``ix_queued_jobs_pull_no_gpu`` is the same line without the jobs that need a GPU,
    read by pulls that offer none, so GPU jobs waiting for a GPU worker never slow
    down CPU workers;
    ``ix_queued_jobs_lease_expires_at`` holds only leased rows (the reaper);
    ``ix_queued_jobs_worker_status`` finds the jobs a worker holds (file access).
    """

    __tablename__ = "queued_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(Integer, unique=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    paths_upload: Mapped[dict[str, str]] = mapped_column(JSON)
    environment: Mapped[str | None] = mapped_column(String(16))
    group_name: Mapped[str | None] = mapped_column(String(255))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    # 0 when the job asks for nothing, so that a pull compares with a plain <=.
    cpu_cores: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    memory: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    gpu_mem: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    gpu_model: Mapped[str | None] = mapped_column(String(255))
    gpu_archi: Mapped[str | None] = mapped_column(String(255))
    gpus: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    status: Mapped[JobStatus] = mapped_column(StatusType(), default=JobStatus.QUEUED)
    worker: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    failed_workers: Mapped[list[str]] = mapped_column(JSON, default=list)
    runtime_details: Mapped[str | None] = mapped_column(Text)
    log_upload_until: Mapped[datetime | None] = mapped_column(UtcDateTime())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())

    __table_args__ = (
        CheckConstraint(STATUS_CHECK, name="status"),
        Index(
            "ix_queued_jobs_pull",
            "environment",
            priority.desc(),
            "created_at",
            "id",
            *PULL_REQUIREMENTS,
            postgresql_where=text(QUEUED_ONLY),
            sqlite_where=text(QUEUED_ONLY),
        ),
        Index(
            "ix_queued_jobs_pull_no_gpu",
            "environment",
            priority.desc(),
            "created_at",
            "id",
            *PULL_REQUIREMENTS,
            postgresql_where=text(QUEUED_NO_GPU),
            sqlite_where=text(QUEUED_NO_GPU),
        ),
        Index(
            "ix_queued_jobs_lease_expires_at",
            "lease_expires_at",
            postgresql_where=text(LEASED_ONLY),
            sqlite_where=text(LEASED_ONLY),
        ),
        Index("ix_queued_jobs_worker_status", "worker", "status"),
    )


class StatusOutbox(Base):
    """A status change the user API has not acknowledged yet. Rows are sent in id
    order and deleted once acknowledged, so a change survives restarts of either API.

    ``outcome`` is how the attempt ended (``labcloud.contract.Outcome`` as JSON),
    set with terminal statuses; NULL for the others and for a worker that sent none
    and was not given up by the reaper."""

    __tablename__ = "status_outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(Integer)
    status: Mapped[JobStatus] = mapped_column(StatusType())
    runtime_details: Mapped[str | None] = mapped_column(Text)
    outcome: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())

    __table_args__ = (CheckConstraint(STATUS_CHECK, name="status"),)


class UsedUploadToken(Base):
    """An upload URL already used (its token's nonce), kept until the URL expires:
    an upload URL is good for one upload (``labcloud.storage.redeem``)."""

    __tablename__ = "used_upload_tokens"

    nonce: Mapped[str] = mapped_column(String(32), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime(), index=True)


USED_UPLOAD_TOKENS = cast(Table, UsedUploadToken.__table__)


class ConnectedWorker(Base):
    """A worker as its last pulls and keep-alives showed it (``worker_api.workers``):
    one row per worker name, written by at most one upsert every few seconds per
    worker and process, so that every worker API process knows which workers are
    connected (seen within ``WORKER_SEEN_WINDOW_SECONDS``) and what they offer.

    ``memory`` ... ``gpu_archi`` are the free capacity of the last pull; the
    ``peak_*`` columns the largest offer seen since the worker (re)connected, which
    tells a job that no worker could ever run from one whose workers are busy."""

    __tablename__ = "connected_workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    environment: Mapped[str] = mapped_column(String(16))
    groups: Mapped[list[str]] = mapped_column(JSON, default=list)
    memory: Mapped[int] = mapped_column(Integer)
    cpu_cores: Mapped[int] = mapped_column(Integer)
    gpus: Mapped[int] = mapped_column(Integer)
    gpu_mem: Mapped[int] = mapped_column(Integer)
    gpu_model: Mapped[str | None] = mapped_column(String(255))
    gpu_archi: Mapped[str | None] = mapped_column(String(255))
    peak_memory: Mapped[int] = mapped_column(Integer)
    peak_cpu_cores: Mapped[int] = mapped_column(Integer)
    peak_gpus: Mapped[int] = mapped_column(Integer)
    peak_gpu_mem: Mapped[int] = mapped_column(Integer)
    # The pull's older_than: how old a job for "anywhere" must be for this worker.
    older_than: Mapped[float] = mapped_column(Float)
    connected_at: Mapped[datetime] = mapped_column(UtcDateTime())
    last_pull_at: Mapped[datetime] = mapped_column(UtcDateTime())
    last_seen_at: Mapped[datetime] = mapped_column(UtcDateTime(), index=True)


CONNECTED_WORKERS = cast(Table, ConnectedWorker.__table__)


class LiveLog(Base):
    """A job's live log as its runners shipped it (``worker_api.logs``): how many
    bytes are stored (``size``, never more than LIVE_LOG_MAX_BYTES), whether a flood
    was cut short (``truncated``: the marker line is the last thing stored), the
    run whose chunks arrive now (``run``: the token its runner sends) and where its
    bytes begin in the log (``run_base``: a runner counts offsets from its own
    run's start), and the tool's latest progress. ``job_id`` is the user API's id:
    the log outlives the queue row's attempts."""

    __tablename__ = "live_logs"

    job_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    size: Mapped[int] = mapped_column(Integer, default=0)
    truncated: Mapped[bool] = mapped_column(Boolean, default=False)
    run: Mapped[str] = mapped_column(String(64), default="")
    run_base: Mapped[int] = mapped_column(Integer, default=0)
    progress_fraction: Mapped[float | None] = mapped_column(Float)
    progress_message: Mapped[str | None] = mapped_column(Text)
    progress_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())


class LiveLogChunk(Base):
    """Bytes ``[start, end)`` of a job's live log, as one shipment stored them."""

    __tablename__ = "live_log_chunks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(Integer)
    start: Mapped[int] = mapped_column(Integer)
    end: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)

    __table_args__ = (Index("ix_live_log_chunks_job_id_end", "job_id", "end"),)
