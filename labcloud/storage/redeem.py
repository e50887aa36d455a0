"""Upload URLs that are good for one upload.

Each upload token carries a random nonce (``labcloud.storage.signing``). The API
that issued the token records the nonce in a small table (``used_upload_tokens``,
one per API database) when an upload through it begins, until the token expires;
a second upload with the same URL finds the nonce and is refused with 403.

The record is taken *before* the body is stored, in a transaction of its own that
commits at once, so two concurrent uploads with one URL cannot both pass, and no
transaction stays open while a file streams in. An upload that is then refused
(over the storage limit, a bad file name, a folder in the way) gives the record
back: the URL was not used, and a client may retry it after freeing space. Only
an upload that was stored, or a server that died mid-way, uses the URL up.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Insert, Table, delete, insert
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from labcloud.storage.signing import SignedTransfer, SignedUrlUsed

# Longest nonce a token may carry: more is not a token this code issued.
NONCE_LENGTH = 32


def claim_upload(session: Session, table: Table, transfer: SignedTransfer, now: datetime) -> None:
    """Record that the upload token ``transfer`` is being used; raise
    ``SignedUrlUsed`` when it already was. Also forgets tokens that expired (they
    are refused for their expiry anyway), so the table holds at most one hour of
    uploads."""
    assert transfer.nonce is not None, "only upload tokens are used once"
    session.execute(delete(table).where(table.c.expires_at < now))
    values = {
        "nonce": transfer.nonce[:NONCE_LENGTH],
        "expires_at": datetime.fromtimestamp(transfer.expires_at, UTC),
    }
    dialect = session.get_bind().dialect.name
    statement: Insert
    if dialect == "postgresql":
        statement = postgresql_insert(table).values(values).on_conflict_do_nothing()
    elif dialect == "sqlite":
        statement = sqlite_insert(table).values(values).on_conflict_do_nothing()
    else:  # pragma: no cover - LabCloud runs on SQLite and PostgreSQL only
        statement = insert(table).values(values)
    # RETURNING says for certain whether this insert took the row: the row count
    # of a conflicting insert came back as 1 through psycopg.
    if session.execute(statement.returning(table.c.nonce)).first() is None:
        raise SignedUrlUsed(
            "this upload URL has already been used: an upload URL is good for one upload, "
            "ask for a new one"
        )


def release_upload(session: Session, table: Table, transfer: SignedTransfer) -> None:
    """Give back the record of an upload that was refused, so its URL works again."""
    assert transfer.nonce is not None
    session.execute(delete(table).where(table.c.nonce == transfer.nonce[:NONCE_LENGTH]))
