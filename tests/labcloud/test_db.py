"""The request unit of work: one transaction, committed or rolled back in one
worker thread, callbacks only after a commit."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from labcloud.db import after_commit, create_db_engine, make_session_factory, request_unit_of_work


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE notes (body TEXT)"))
    return engine


def _notes(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.execute(text("SELECT body FROM notes")).scalars())


def test_commits_and_then_runs_callbacks(engine: Engine) -> None:
    factory = make_session_factory(engine)
    seen: list[list[str]] = []

    async def request() -> None:
        async with request_unit_of_work(factory) as session:
            await asyncio.to_thread(session.execute, text("INSERT INTO notes VALUES ('kept')"))
            after_commit(session, lambda: seen.append(_notes(engine)))

    asyncio.run(request())
    assert _notes(engine) == ["kept"]
    assert seen == [["kept"]]  # the callback saw the committed row


def test_rolls_back_on_error_without_callbacks(engine: Engine) -> None:
    factory = make_session_factory(engine)
    seen: list[str] = []

    async def request() -> None:
        async with request_unit_of_work(factory) as session:
            await asyncio.to_thread(session.execute, text("INSERT INTO notes VALUES ('lost')"))
            after_commit(session, lambda: seen.append("called"))
            raise LookupError("the endpoint failed")

    with pytest.raises(LookupError):
        asyncio.run(request())
    assert _notes(engine) == []
    assert seen == []


def test_a_cancelled_request_still_ends_its_transaction(engine: Engine) -> None:
    """Cancelled while its rollback runs in a thread: the rollback finishes (the
    connection goes back to the pool clean) before the cancellation goes on."""
    factory = make_session_factory(engine)

    async def request() -> None:
        async with request_unit_of_work(factory) as session:
            await asyncio.to_thread(session.execute, text("INSERT INTO notes VALUES ('lost')"))
            await asyncio.sleep(3600)

    async def cancel_it() -> None:
        task = asyncio.create_task(request())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_it())
    assert _notes(engine) == []
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
