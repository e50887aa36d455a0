"""active jobs counted on the account

Revision ID: 0003
Revises: 0002

``users.active_jobs`` is the number of the account's jobs that are not terminal,
kept by the statements that create jobs and end them. A submission checks and
raises it in one guarded ``UPDATE`` instead of locking the account and counting
its jobs (which grew with the number of jobs queued).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# The non-terminal statuses when this revision was written (a migration must not
# follow later changes of the application's enums).
_ACTIVE = ("queued", "pulled", "preprocessing", "running", "postprocessing")


def upgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("active_jobs", sa.Integer(), server_default="0", nullable=False)
        )
    users = sa.table("users", sa.column("id"), sa.column("active_jobs"))
    jobs = sa.table("jobs", sa.column("user_id"), sa.column("status"))
    active = (
        sa.select(sa.func.count())
        .select_from(jobs)
        .where(jobs.c.user_id == users.c.id, jobs.c.status.in_(_ACTIVE))
        .scalar_subquery()
    )
    op.execute(users.update().values(active_jobs=active))


def downgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("active_jobs")
