"""Relays are woken by the commit of a transaction that wrote to their outbox."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.orm import sessionmaker

from labcloud.outbox import note_written, register_waker


def test_commit_wakes_relays_of_written_outboxes_and_rollback_wakes_none(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    sessions = sessionmaker(engine)
    woken: list[str] = []
    unregister = register_waker("test_outbox", lambda: woken.append("test_outbox"))
    register_waker("other_outbox", lambda: woken.append("other_outbox"))()
    try:
        with sessions() as session:
            session.execute(text("SELECT 1"))
            note_written(session, "test_outbox")
            assert woken == []  # not before the commit
            session.commit()
        assert woken == ["test_outbox"]

        with sessions() as session:
            session.execute(text("SELECT 1"))
            note_written(session, "test_outbox")
            session.rollback()
            session.commit()  # a later commit of the same session wakes nobody
        assert woken == ["test_outbox"]
    finally:
        unregister()
    with sessions() as session:
        note_written(session, "test_outbox")
        session.commit()
    assert woken == ["test_outbox"]  # unregistered
