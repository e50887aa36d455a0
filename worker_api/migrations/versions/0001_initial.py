"""The queue and the status outbox.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out rather than imported from the models: a migration must keep meaning
# what it meant when it was written.
STATUS_CHECK = (
    "status IN ('queued', 'pulled', 'preprocessing', 'running', 'postprocessing', "
    "'finished', 'error', 'canceled')"
)


def upgrade() -> None:
    op.create_table(
        "queued_jobs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("paths_upload", sa.JSON(), nullable=False),
        sa.Column("environment", sa.String(length=16), nullable=True),
        sa.Column("group_name", sa.String(length=255), nullable=True),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("cpu_cores", sa.Integer(), nullable=True),
        sa.Column("memory", sa.Integer(), nullable=True),
        sa.Column("gpu_mem", sa.Integer(), nullable=True),
        sa.Column("gpu_model", sa.String(length=255), nullable=True),
        sa.Column("gpu_archi", sa.String(length=255), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("worker", sa.String(length=255), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("failed_workers", sa.JSON(), nullable=False),
        sa.Column("runtime_details", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(STATUS_CHECK, name=op.f("ck_queued_jobs_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_queued_jobs")),
        sa.UniqueConstraint("job_id", name=op.f("uq_queued_jobs_job_id")),
    )
    op.create_index(
        op.f("ix_queued_jobs_pull"),
        "queued_jobs",
        ["status", "environment", sa.text("priority DESC"), "created_at"],
    )
    op.create_table(
        "status_outbox",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("runtime_details", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(STATUS_CHECK, name=op.f("ck_status_outbox_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_status_outbox")),
    )


def downgrade() -> None:
    op.drop_table("status_outbox")
    op.drop_index("ix_queued_jobs_pull", table_name="queued_jobs")
    op.drop_table("queued_jobs")
