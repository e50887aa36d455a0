"""Database helpers shared by both APIs: engines, sessions, migrations, column types."""

from __future__ import annotations

import urllib.parse
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import DateTime, Engine, create_engine, event, text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from labcloud.threads import run_to_completion


def build_database_url(url: str, secret: str | None = None) -> str:
    """Fill the ``{}`` placeholder of ``url`` with the URL-quoted secret (a value: the
    settings resolved any Secrets Manager ARN when they were loaded) and select the
    psycopg 3 driver for plain ``postgresql://`` URLs."""
    if "{}" in url:
        if not secret:
            raise ValueError("the database URL has a {} placeholder but no secret is set")
        url = url.replace("{}", urllib.parse.quote(secret, safe=""))
    if url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def create_db_engine(
    url: str, *, pool_size: int = 20, max_overflow: int = 10, pool_timeout: float = 30
) -> Engine:
    """An engine tuned for the backend: WAL and a busy timeout on SQLite so readers
    never block the writer; a bounded, pre-pinged pool on PostgreSQL."""
    if is_sqlite(url):
        if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _configure_sqlite)
        event.listen(engine, "begin", _begin_immediate)
        return engine
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout,
        pool_pre_ping=True,
    )


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy drive transactions (pysqlite's own BEGIN handling is broken
    # for SERIALIZABLE semantics), see the SQLAlchemy pysqlite docs.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _begin_immediate(connection: Any) -> None:
    # Take the write lock when the transaction starts: a read-then-write transaction
    # (a lease, a guarded status update) can then never fail half-way with
    # "database is locked" and behaves like SELECT ... FOR UPDATE.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def first_statement_locks_writers(factory: sessionmaker[Session]) -> bool:
    """Whether a transaction of ``factory`` takes the database's write lock at its
    first statement, reads included (SQLite, see ``_begin_immediate``); on
    PostgreSQL reads lock nothing."""
    bind = factory.kw.get("bind")
    return bind is not None and bind.dialect.name == "sqlite"


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


_AFTER_COMMIT = "labcloud.after_commit"


def after_commit(session: Session, callback: Callable[[], None]) -> None:
    """Run ``callback`` once the unit of work around ``session`` committed (not at
    all if it rolls back). Callbacks run in the thread that committed."""
    session.info.setdefault(_AFTER_COMMIT, []).append(callback)


def _run_after_commit(session: Session) -> None:
    for callback in session.info.pop(_AFTER_COMMIT, []):
        callback()


@contextmanager
def unit_of_work(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: committed when the block ends, rolled back on error."""
    with factory() as session:
        with session.begin():
            yield session
        _run_after_commit(session)


@asynccontextmanager
async def request_unit_of_work(factory: sessionmaker[Session]) -> AsyncIterator[Session]:
    """``unit_of_work`` for an async request dependency whose session is used by sync
    code in the thread pool (dependencies and endpoints).

    Opening costs no thread: a session takes its connection at its first statement.
    The commit (or rollback) and the return of the connection run in one worker
    thread, which the request waits for even when cancelled, so a transaction is
    never left half-finished. A sync generator dependency would cost two thread
    hand-overs per request, a measurable share of a short request's CPU time."""
    session = factory()
    session.begin()
    try:
        yield session
    except BaseException:
        await run_to_completion(_end, session, False)
        raise
    await run_to_completion(_end, session, True)


def _end(session: Session, commit: bool) -> None:
    try:
        if commit:
            session.commit()
        else:
            session.rollback()
    finally:
        session.close()
    if commit:
        _run_after_commit(session)


def migrate(engine: Engine, script_location: Path) -> None:
    """Bring the database to the newest revision of the Alembic environment at
    ``script_location``."""
    config = Config()
    config.set_main_option("script_location", str(script_location))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Several processes starting at once (uvicorn --workers, a rolling
            # deploy) migrate one after the other: the later ones find the database
            # at head. (SQLite transactions already hold the write lock.)
            key = zlib.crc32(f"labcloud-migrate:{script_location.parent.name}".encode())
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UtcDateTime column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
