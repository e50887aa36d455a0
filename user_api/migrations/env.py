"""Alembic environment of the user API database. ``labcloud.db.migrate`` passes an
open connection in ``config.attributes["connection"]``; the ``alembic`` command line
works too, with ``-x url=...``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from labcloud.db import build_database_url
from user_api.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite can only alter tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit("pass the database URL with: alembic -x url=... upgrade head")
    with create_engine(build_database_url(url)).begin() as conn:
        _run(conn)
