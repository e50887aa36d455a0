"""The user API's tables. ORM classes stay inside the service layer; responses are
built from them by the schemas of each domain."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
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
