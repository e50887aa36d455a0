"""Upload URLs used once.

``used_upload_tokens`` holds the nonce of each signed upload URL that was used,
until the URL expires, so that an upload URL is good for one upload.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-10
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "used_upload_tokens",
        sa.Column("nonce", sa.String(length=32), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("nonce", name=op.f("pk_used_upload_tokens")),
    )
    op.create_index(
        op.f("ix_used_upload_tokens_expires_at"),
        "used_upload_tokens",
        ["expires_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_used_upload_tokens_expires_at"), table_name="used_upload_tokens")
    op.drop_table("used_upload_tokens")
