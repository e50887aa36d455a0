"""Hardware requirements as numbers in the pull indexes.

A job that needs no cores, memory or GPU memory now says 0 instead of NULL, so a
pull can compare each requirement with what it offers as a plain ``<=``. The two
pull indexes carry the requirements after their order columns: PostgreSQL then
checks them on the index entries as it walks the line and reads a table row only
for a job that fits, instead of reading every row ahead (a worker behind 100,000
jobs that all need more memory than it has: 6 ms instead of 36 ms).

On a large PostgreSQL queue the indexes are rebuilt while writes to the table wait
(seconds per million rows); run the upgrade in a quiet moment.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out rather than imported from the models (see 0001).
QUEUED_ONLY = "status = 'queued'"
QUEUED_NO_GPU = "status = 'queued' AND gpus = 0"
REQUIREMENTS = ("cpu_cores", "memory", "gpu_mem")
PULL_ORDER: list[str | sa.TextClause] = [
    "environment",
    sa.text("priority DESC"),
    "created_at",
    "id",
]


def _pull_indexes(columns: list[str | sa.TextClause]) -> None:
    for name, predicate in (
        ("ix_queued_jobs_pull", QUEUED_ONLY),
        ("ix_queued_jobs_pull_no_gpu", QUEUED_NO_GPU),
    ):
        op.create_index(
            name,
            "queued_jobs",
            columns,
            postgresql_where=sa.text(predicate),
            sqlite_where=sa.text(predicate),
        )


def _drop_pull_indexes() -> None:
    op.drop_index("ix_queued_jobs_pull_no_gpu", table_name="queued_jobs")
    op.drop_index("ix_queued_jobs_pull", table_name="queued_jobs")


def upgrade() -> None:
    _drop_pull_indexes()
    for column in REQUIREMENTS:
        op.execute(f"UPDATE queued_jobs SET {column} = 0 WHERE {column} IS NULL")  # noqa: S608
    # SQLite changes a column's nullability by copying the table.
    with op.batch_alter_table("queued_jobs") as batch:
        for column in REQUIREMENTS:
            batch.alter_column(
                column,
                existing_type=sa.Integer(),
                nullable=False,
                server_default=sa.text("0"),
            )
    _pull_indexes([*PULL_ORDER, *REQUIREMENTS, "gpus"])


def downgrade() -> None:
    _drop_pull_indexes()
    with op.batch_alter_table("queued_jobs") as batch:
        for column in REQUIREMENTS:
            batch.alter_column(
                column, existing_type=sa.Integer(), nullable=True, server_default=None
            )
    for column in REQUIREMENTS:
        op.execute(f"UPDATE queued_jobs SET {column} = NULL WHERE {column} = 0")  # noqa: S608
    _pull_indexes(PULL_ORDER)
