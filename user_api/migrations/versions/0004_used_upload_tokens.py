"""upload URLs used once

Revision ID: 0004
Revises: 0003

``used_upload_tokens`` holds the nonce of each signed upload URL that was used,
until the URL expires, so that an upload URL is good for one upload.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "used_upload_tokens",
        sa.Column("nonce", sa.String(length=32), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("nonce"),
    )
    op.create_index(
        "ix_used_upload_tokens_expires_at", "used_upload_tokens", ["expires_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_used_upload_tokens_expires_at", table_name="used_upload_tokens")
    op.drop_table("used_upload_tokens")
