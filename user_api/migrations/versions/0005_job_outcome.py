"""how a job ended, as structured data

Revision ID: 0005
Revises: 0004

``jobs.outcome`` holds the ``Outcome`` reported with a job's terminal status (exit
code, failure kind, attempt, start and end times, log tail) beside the free-text
``runtime_details``. Jobs that ended before this revision keep NULL.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("outcome", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("outcome")
