"""GPU counts, the log grace of cancelled jobs, and indexes for large queues.

- ``queued_jobs.gpus``: GPUs a job needs, matched against a pull's ``gpus``. Rows
  queued before this revision need one GPU when they ask for any GPU property.
- ``queued_jobs.log_upload_until``: until when the last worker of a cancelled job
  may upload its log.
- ``ix_queued_jobs_pull`` becomes a partial index of queued rows only, ordered as a
  pull reads them, and ``ix_queued_jobs_pull_no_gpu`` the same for jobs that need no
  GPU (pulls that offer none); the reaper and the worker's file access get their own
  indexes.

On a large PostgreSQL queue, ``CREATE INDEX`` blocks writes to the table while it
builds (seconds per million rows); run the upgrade in a quiet moment.

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out rather than imported from the models (see 0001).
QUEUED_ONLY = "status = 'queued'"
LEASED_ONLY = "lease_expires_at IS NOT NULL"
QUEUED_NO_GPU = "status = 'queued' AND gpus = 0"


def upgrade() -> None:
    op.add_column(
        "queued_jobs",
        sa.Column("gpus", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.add_column(
        "queued_jobs", sa.Column("log_upload_until", sa.DateTime(timezone=True), nullable=True)
    )
    op.execute(
        "UPDATE queued_jobs SET gpus = 1 "
        "WHERE gpu_mem > 0 OR gpu_model IS NOT NULL OR gpu_archi IS NOT NULL"
    )
    op.drop_index("ix_queued_jobs_pull", table_name="queued_jobs")
    op.create_index(
        "ix_queued_jobs_pull",
        "queued_jobs",
        ["environment", sa.text("priority DESC"), "created_at", "id"],
        postgresql_where=sa.text(QUEUED_ONLY),
        sqlite_where=sa.text(QUEUED_ONLY),
    )
    op.create_index(
        "ix_queued_jobs_pull_no_gpu",
        "queued_jobs",
        ["environment", sa.text("priority DESC"), "created_at", "id"],
        postgresql_where=sa.text(QUEUED_NO_GPU),
        sqlite_where=sa.text(QUEUED_NO_GPU),
    )
    op.create_index(
        "ix_queued_jobs_lease_expires_at",
        "queued_jobs",
        ["lease_expires_at"],
        postgresql_where=sa.text(LEASED_ONLY),
        sqlite_where=sa.text(LEASED_ONLY),
    )
    op.create_index("ix_queued_jobs_worker_status", "queued_jobs", ["worker", "status"])


def downgrade() -> None:
    op.drop_index("ix_queued_jobs_worker_status", table_name="queued_jobs")
    op.drop_index("ix_queued_jobs_lease_expires_at", table_name="queued_jobs")
    op.drop_index("ix_queued_jobs_pull_no_gpu", table_name="queued_jobs")
    op.drop_index("ix_queued_jobs_pull", table_name="queued_jobs")
    # SQLite drops columns by copying the table: done before the old pull index is
    # rebuilt, so that the copy does not have to carry it.
    with op.batch_alter_table("queued_jobs") as batch:
        batch.drop_column("log_upload_until")
        batch.drop_column("gpus")
    op.create_index(
        "ix_queued_jobs_pull",
        "queued_jobs",
        ["status", "environment", sa.text("priority DESC"), "created_at"],
    )
