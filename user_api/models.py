"""The user API's tables. ORM classes stay inside the service layer; responses are
built from them by the schemas of each domain."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from labcloud.contract import JobStatus
from labcloud.db import UtcDateTime, utcnow


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UtcDateTime,
        dict[str, Any]: JSON,
        list[str]: JSON,
    }


def _in_check(column: str, values: type[StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class User(Base):
    __tablename__ = "users"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Stable id used in storage paths and tokens' ``sub``: a random hex id for local
    # accounts, the Cognito ``sub`` for Cognito accounts.
    subject: Mapped[str] = mapped_column(String(64), unique=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str | None] = mapped_column(String(255))
    groups: Mapped[list[str]]
    is_active: Mapped[bool] = mapped_column(default=True)
    # False while a self-signed-up account waits for an admin (SIGNUP_REQUIRES_APPROVAL).
    is_approved: Mapped[bool] = mapped_column(default=True, server_default=true())
    email_notifications: Mapped[bool] = mapped_column(default=True, server_default=true())
    # Per-user limits set by admins; None means the default from the settings.
    max_active_jobs: Mapped[int | None]
    max_storage_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # Jobs of the account that are not terminal: raised by a submission (guarded by
    # the limit in the same UPDATE), lowered by the transition that ends a job.
    active_jobs: Mapped[int] = mapped_column(default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("user_id", "job_name", name="uq_jobs_user_id_job_name"),
        CheckConstraint(_in_check("status", JobStatus), name="ck_jobs_status"),
        CheckConstraint("priority BETWEEN 0 AND 5", name="ck_jobs_priority"),
        # GET /jobs: one user's jobs, newest first.
        Index("ix_jobs_user_id_date_created", "user_id", "date_created", "id"),
        # Ids are never reused (SQLite would otherwise hand out the id of the last
        # deleted row again): the worker API knows jobs by this id.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    job_name: Mapped[str] = mapped_column(String(128))
    environment: Mapped[str | None] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(default=0)
    application: Mapped[dict[str, Any]]
    attributes: Mapped[dict[str, Any]]
    hardware: Mapped[dict[str, Any]]
    # The catalog entry the job was started with: editing or removing that version
    # later never breaks listing or running this job.
    entrypoint_snapshot: Mapped[dict[str, Any]]
    paths_out: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    runtime_details: Mapped[str | None] = mapped_column(Text)
    # How the job's last attempt ended (``labcloud.contract.Outcome`` as JSON), set
    # with its terminal status; None while it is active, and for jobs that ended
    # before outcomes were recorded.
    outcome: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    date_created: Mapped[datetime] = mapped_column(default=utcnow)
    date_started: Mapped[datetime | None]
    date_finished: Mapped[datetime | None]


class OutboxKind(StrEnum):
    ENQUEUE = "enqueue"
    CANCEL = "cancel"


class WorkerOutbox(Base):
    """Messages for the worker API, written in the same transaction as the change
    they announce and deleted once the worker API acknowledged them."""

    __tablename__ = "worker_outbox"
    __table_args__ = (CheckConstraint(_in_check("kind", OutboxKind), name="ck_worker_outbox_kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(index=True)
    kind: Mapped[str] = mapped_column(String(16))
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EmailStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


class EmailOutbox(Base):
    """One completion email per job, written in the transaction that ends the job and
    sent by a background task with retries, so sending never blocks or fails a status
    update and survives restarts."""

    __tablename__ = "email_outbox"
    __table_args__ = (
        CheckConstraint(_in_check("status", EmailStatus), name="ck_email_outbox_status"),
        Index("ix_email_outbox_status_next_attempt_at", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Unique: a job ends once, so it is announced once, however often its terminal
    # status is delivered.
    job_id: Mapped[int] = mapped_column(unique=True)
    recipient: Mapped[str] = mapped_column(String(320))
    subject: Mapped[str] = mapped_column(String(255))
    html: Mapped[str] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=EmailStatus.PENDING.value)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None]


class AuditEntry(Base):
    """An admin action. Rows are only ever inserted (the service has no update or
    delete for them)."""

    __tablename__ = "audit_log"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(320))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(320))
    details: Mapped[dict[str, Any]]


class UsedUploadToken(Base):
    """An upload URL already used (its token's nonce), kept until the URL expires:
    an upload URL is good for one upload (``labcloud.storage.redeem``)."""

    __tablename__ = "used_upload_tokens"

    nonce: Mapped[str] = mapped_column(String(32), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class StorageUsage(Base):
    """The bytes an account's files take (``user_api.files.usage``), so that storage
    limits hold without listing storage. Keyed by the subject, which names the
    account's folder (an account Cognito vouches for may have no ``users`` row).

    Writes change ``used_bytes`` only by guarded ``UPDATE ... SET used_bytes =
    used_bytes + :delta``; every change bumps ``version``, so a recount from storage
    is stored only if nothing changed while it walked the folder."""

    __tablename__ = "storage_usage"

    subject: Mapped[str] = mapped_column(String(64), primary_key=True)
    used_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # Writes that reserved bytes and have not settled: a recount waits for them.
    in_flight: Mapped[int] = mapped_column(default=0, server_default="0")
    version: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # When the count was last taken from storage, and last changed at all.
    counted_at: Mapped[datetime]
    changed_at: Mapped[datetime]
    # Until then bytes may land outside the API (a presigned upload URL is out, a
    # job's results are coming): checks recount from storage until it has passed.
    unsettled_until: Mapped[datetime | None]


# The tables as Core ``Table`` objects (``__table__`` is typed as a plain
# ``FromClause``), for the hot paths that skip the ORM: statements compiled once.
USERS = cast(Table, User.__table__)
JOBS = cast(Table, Job.__table__)
WORKER_OUTBOX = cast(Table, WorkerOutbox.__table__)
USED_UPLOAD_TOKENS = cast(Table, UsedUploadToken.__table__)
STORAGE_USAGE = cast(Table, StorageUsage.__table__)
