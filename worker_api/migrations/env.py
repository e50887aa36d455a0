"""Alembic environment of the worker API's queue database.

``labcloud.db.migrate`` passes an open connection in ``config.attributes``; the
command line (``alembic -x url=...``) is not supported on purpose: the service
migrates itself at start, with the same URL resolution as at run time.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from worker_api.models import Base


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if not isinstance(connection, Connection):
        raise RuntimeError(
            "the worker API migrations run through labcloud.db.migrate, which passes a connection"
        )
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite cannot ALTER most things in place; batch mode recreates tables.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported")
run_migrations_online()
