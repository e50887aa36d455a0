"""Connected workers.

``connected_workers`` holds one row per worker: its environment and groups, the
capacity of its last pull and the largest offer since it connected, when it last
pulled and was last seen (pull or keep-alive). Every worker API process writes and
reads it, so a job's waiting reason and the admins' list of workers are the same
whichever process answers.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "connected_workers",
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("environment", sa.String(length=16), nullable=False),
        sa.Column("groups", sa.JSON(), nullable=False),
        sa.Column("memory", sa.Integer(), nullable=False),
        sa.Column("cpu_cores", sa.Integer(), nullable=False),
        sa.Column("gpus", sa.Integer(), nullable=False),
        sa.Column("gpu_mem", sa.Integer(), nullable=False),
        sa.Column("gpu_model", sa.String(length=255), nullable=True),
        sa.Column("gpu_archi", sa.String(length=255), nullable=True),
        sa.Column("peak_memory", sa.Integer(), nullable=False),
        sa.Column("peak_cpu_cores", sa.Integer(), nullable=False),
        sa.Column("peak_gpus", sa.Integer(), nullable=False),
        sa.Column("peak_gpu_mem", sa.Integer(), nullable=False),
        sa.Column("older_than", sa.Float(), nullable=False),
        sa.Column("connected_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_pull_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_connected_workers")),
    )
    op.create_index(
        op.f("ix_connected_workers_last_seen_at"),
        "connected_workers",
        ["last_seen_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_connected_workers_last_seen_at"), table_name="connected_workers")
    op.drop_table("connected_workers")
