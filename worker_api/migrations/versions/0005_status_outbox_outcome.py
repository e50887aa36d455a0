"""How a job's attempt ended, on its way to the user API.

``status_outbox.outcome`` carries the structured ``Outcome`` (exit code, failure
kind, attempt, times, log tail) of a terminal status beside ``runtime_details``:
the runner's report, completed by the worker API with the attempt number, or the
reaper's ``lost``. Nullable: earlier rows and non-terminal statuses have none.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("status_outbox") as batch:
        batch.add_column(sa.Column("outcome", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("status_outbox") as batch:
        batch.drop_column("outcome")
