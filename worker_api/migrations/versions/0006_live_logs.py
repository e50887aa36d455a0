"""Live logs: the chunks of a running job's output its runner ships, bounded per
job, and the tool's latest progress (``worker_api.logs``).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "live_logs",
        sa.Column("job_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("truncated", sa.Boolean(), nullable=False),
        sa.Column("run", sa.String(length=64), nullable=False),
        sa.Column("run_base", sa.Integer(), nullable=False),
        sa.Column("progress_fraction", sa.Float(), nullable=True),
        sa.Column("progress_message", sa.Text(), nullable=True),
        sa.Column("progress_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_live_logs")),
    )
    op.create_table(
        "live_log_chunks",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("start", sa.Integer(), nullable=False),
        sa.Column("end", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_live_log_chunks")),
    )
    op.create_index(
        "ix_live_log_chunks_job_id_end", "live_log_chunks", ["job_id", "end"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_live_log_chunks_job_id_end", table_name="live_log_chunks")
    op.drop_table("live_log_chunks")
    op.drop_table("live_logs")
