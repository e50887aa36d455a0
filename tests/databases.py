"""Throwaway PostgreSQL databases for tests."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def temporary_postgres_database(admin_url: str) -> Iterator[str]:
    """Create an empty PostgreSQL database, yield its URL, drop it afterwards."""
    from sqlalchemy import create_engine, text

    name = f"labcloud_test_{secrets.token_hex(6)}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
