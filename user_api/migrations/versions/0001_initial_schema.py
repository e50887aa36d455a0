"""initial schema

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from labcloud.db import UtcDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("subject", sa.String(length=64), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=True),
        sa.Column("groups", sa.JSON(), nullable=False),
        sa.Column("is_active", sa.Boolean(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("email"),
        sa.UniqueConstraint("subject"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "worker_outbox",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.CheckConstraint("kind IN ('enqueue', 'cancel')", name="ck_worker_outbox_kind"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("worker_outbox", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_worker_outbox_job_id"), ["job_id"], unique=False)

    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("job_name", sa.String(length=128), nullable=False),
        sa.Column("environment", sa.String(length=16), nullable=True),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("application", sa.JSON(), nullable=False),
        sa.Column("attributes", sa.JSON(), nullable=False),
        sa.Column("hardware", sa.JSON(), nullable=False),
        sa.Column("entrypoint_snapshot", sa.JSON(), nullable=False),
        sa.Column("paths_out", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("runtime_details", sa.Text(), nullable=True),
        sa.Column("date_created", UtcDateTime(), nullable=False),
        sa.Column("date_started", UtcDateTime(), nullable=True),
        sa.Column("date_finished", UtcDateTime(), nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'pulled', 'preprocessing', 'running', "
            "'postprocessing', 'finished', 'error', 'canceled')",
            name="ck_jobs_status",
        ),
        sa.CheckConstraint("priority BETWEEN 0 AND 5", name="ck_jobs_priority"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("user_id", "job_name", name="uq_jobs_user_id_job_name"),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(
            "ix_jobs_user_id_date_created", ["user_id", "date_created", "id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_user_id_date_created")

    op.drop_table("jobs")
    with op.batch_alter_table("worker_outbox", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_worker_outbox_job_id"))

    op.drop_table("worker_outbox")
    op.drop_table("users")
