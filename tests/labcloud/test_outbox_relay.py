"""The outbox relay engine on SQLite and PostgreSQL, with an outbox of its own: a
table of messages and a receiver that answers what each test tells it."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

import anyio
import pytest
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from labcloud.db import create_db_engine, make_session_factory, unit_of_work
from labcloud.outbox import (
    Acknowledged,
    Backoff,
    DeliveryFailed,
    Failed,
    Rejected,
    Relay,
    Round,
    note_written,
)

NAME = "test_outbox"
metadata = MetaData()
MESSAGES = Table(
    "test_messages",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("body", String(50), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("released", Integer, nullable=False, default=0),
)
REFUSED = Table(
    "test_refused",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("body", String(50), nullable=False),
    Column("reason", String(200), nullable=False),
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    body: str


Receive = Callable[[str], Awaitable[str]]


async def accept(body: str) -> str:
    return "ok"


class MessagesOutbox:
    """Sends each message's body to ``receive``: "ok" acknowledges it, "refuse"
    rejects it for good, anything else is a transient failure."""

    name = NAME

    def __init__(self, receive: Receive = accept, batch_size: int = 10) -> None:
        self.receive = receive
        self.batch_size = batch_size
        self.claimed: Callable[[], None] = lambda: None

    def claim(self, session: Session) -> Sequence[Message]:
        rows = session.execute(
            select(MESSAGES.c.id, MESSAGES.c.body).order_by(MESSAGES.c.id).limit(self.batch_size)
        ).all()
        self.claimed()
        return [Message(row.id, row.body) for row in rows]

    async def send(self, batch: Round[Message]) -> None:
        for message in batch.claimed:
            answer = await self.receive(message.body)
            if answer == "ok":
                batch.record(Acknowledged(message))
            elif answer == "refuse":
                batch.record(Rejected(message, f"{message.body} refused"))
            else:
                batch.record(Failed(message, answer))
                return

    def settle(self, session: Session, batch: Round[Message]) -> None:
        done = batch.acknowledged + [rejected.message for rejected in batch.rejected]
        session.execute(delete(MESSAGES).where(MESSAGES.c.id.in_([m.id for m in done])))
        for rejected in batch.rejected:
            session.execute(
                insert(REFUSED).values(body=rejected.message.body, reason=rejected.reason)
            )
        if batch.failure is not None:
            session.execute(
                update(MESSAGES)
                .where(MESSAGES.c.id == batch.failure.message.id)
                .values(attempts=MESSAGES.c.attempts + 1)
            )
        unsent = [message.id for message in batch.unsent]
        session.execute(
            update(MESSAGES)
            .where(MESSAGES.c.id.in_(unsent))
            .values(released=MESSAGES.c.released + 1)
        )


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = create_db_engine(database_url)
    metadata.create_all(engine)
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()


def write(sessions: sessionmaker[Session], *bodies: str, wake: bool = True) -> None:
    with unit_of_work(sessions) as session:
        for body in bodies:
            session.execute(insert(MESSAGES).values(body=body))
        if wake:
            note_written(session, NAME)


def pending(sessions: sessionmaker[Session]) -> list[tuple[str, int, int]]:
    with unit_of_work(sessions) as session:
        rows = session.execute(
            select(MESSAGES.c.body, MESSAGES.c.attempts, MESSAGES.c.released).order_by(
                MESSAGES.c.id
            )
        )
        return [tuple(row) for row in rows]


def refused(sessions: sessionmaker[Session]) -> list[tuple[str, str]]:
    with unit_of_work(sessions) as session:
        rows = session.execute(select(REFUSED.c.body, REFUSED.c.reason).order_by(REFUSED.c.id))
        return [tuple(row) for row in rows]


def relay(
    sessions: sessionmaker[Session],
    outbox: MessagesOutbox,
    *,
    poll_seconds: float = 60.0,
    backoff: Backoff = Backoff(0.01, 0.05),
) -> Relay[Message]:
    return Relay(outbox, sessions, poll_seconds=poll_seconds, backoff=backoff)


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait until ``condition`` holds; the deadline only bounds a failing test."""
    with anyio.fail_after(30):
        while not condition():  # noqa: ASYNC110 (the database has no event to wait on)
            await anyio.sleep(0.01)


def test_backoff_doubles_up_to_its_cap_and_honours_retry_after() -> None:
    backoff = Backoff(first_seconds=0.1, max_seconds=1.0)
    delays = [0.0]
    for _ in range(6):
        delays.append(backoff.after(delays[-1]))
    assert delays[1:] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert backoff.after(0.1, retry_after=0.5) == 0.5
    assert backoff.after(0.1, retry_after=60) == 1.0


@pytest.mark.anyio
async def test_a_round_settles_acknowledged_and_refused_and_stops_at_a_failure(
    sessions: sessionmaker[Session],
) -> None:
    answers = {"a": "ok", "b": "refuse", "c": "down", "d": "ok"}
    seen: list[str] = []

    async def receive(body: str) -> str:
        seen.append(body)
        return answers[body]

    write(sessions, "a", "b", "c", "d", wake=False)
    outbox = relay(sessions, MessagesOutbox(receive))
    with pytest.raises(DeliveryFailed, match="down"):
        await outbox.deliver_pending()
    # "d" was claimed but not tried: it stays behind "c", released by the settlement.
    assert seen == ["a", "b", "c"]
    assert pending(sessions) == [("c", 1, 0), ("d", 0, 1)]
    assert refused(sessions) == [("b", "b refused")]
    answers["c"] = "ok"
    assert await outbox.deliver_pending() == 2
    assert seen == ["a", "b", "c", "c", "d"]
    assert pending(sessions) == []
    assert outbox.settled == 4


@pytest.mark.anyio
async def test_batches_follow_each_other_until_the_outbox_is_empty(
    sessions: sessionmaker[Session],
) -> None:
    seen: list[str] = []

    async def receive(body: str) -> str:
        seen.append(body)
        return "ok"

    bodies = [f"m{n}" for n in range(7)]
    write(sessions, *bodies, wake=False)
    assert await relay(sessions, MessagesOutbox(receive, batch_size=3)).deliver_pending() == 7
    assert seen == bodies


@pytest.mark.anyio
async def test_failures_back_off_exponentially_then_deliver_in_order(
    sessions: sessionmaker[Session],
) -> None:
    tries: list[float] = []

    async def receive(body: str) -> str:
        if body == "first":
            tries.append(time.monotonic())
            if len(tries) <= 4:
                return "receiver down"
        return "ok"

    write(sessions, "first", "second", wake=False)
    backoff = Backoff(first_seconds=0.05, max_seconds=0.2)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(relay(sessions, MessagesOutbox(receive), backoff=backoff).run)
        await eventually(lambda: not pending(sessions))
        tasks.cancel_scope.cancel()
    assert len(tries) == 5
    gaps = [later - earlier for earlier, later in itertools.pairwise(tries)]
    # Each retry waits at least its delay: 0.05, 0.1, 0.2, then the cap.
    for gap, delay in zip(gaps, [0.05, 0.1, 0.2, 0.2], strict=True):
        assert gap >= delay * 0.9


@pytest.mark.anyio
async def test_a_commit_that_wrote_to_the_outbox_wakes_its_relay_at_once(
    sessions: sessionmaker[Session],
) -> None:
    arrived: dict[str, float] = {}

    async def receive(body: str) -> str:
        arrived[body] = time.monotonic()
        return "ok"

    poll = 60.0
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(relay(sessions, MessagesOutbox(receive), poll_seconds=poll).run)
        await anyio.sleep(0.2)  # the relay found the outbox empty and rests
        latencies = []
        for n in range(3):
            body = f"m{n}"

            def write_and_time(body: str = body) -> float:
                write(sessions, body)
                return time.monotonic()

            # Written from another thread, as a sync endpoint does.
            committed = await anyio.to_thread.run_sync(write_and_time)
            await eventually(lambda body=body: body in arrived)  # type: ignore[misc]
            latencies.append(arrived[body] - committed)
        tasks.cancel_scope.cancel()
    # Far under the poll interval (milliseconds when the machine is idle).
    assert max(latencies) < 5.0, latencies


@pytest.mark.anyio
async def test_rows_written_without_a_wake_up_are_found_by_polling(
    sessions: sessionmaker[Session],
) -> None:
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(relay(sessions, MessagesOutbox(), poll_seconds=0.05).run)
        await anyio.sleep(0.1)
        write(sessions, "from another process", wake=False)
        await eventually(lambda: not pending(sessions))
        tasks.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_cancelled_send_settles_what_was_delivered(
    sessions: sessionmaker[Session],
) -> None:
    sending_second = asyncio.Event()

    async def receive(body: str) -> str:
        if body == "second":
            sending_second.set()
            await asyncio.sleep(60)
        return "ok"

    write(sessions, "first", "second", "third", wake=False)
    task = asyncio.ensure_future(relay(sessions, MessagesOutbox(receive)).run())
    await asyncio.wait_for(sending_second.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # "first" is recorded; the others stay, in order, let go by the settlement.
    assert pending(sessions) == [("second", 0, 1), ("third", 0, 1)]


@pytest.mark.anyio
async def test_a_cancellation_during_the_claim_waits_for_it_and_lets_the_claim_go(
    sessions: sessionmaker[Session],
) -> None:
    claiming, go_on = threading.Event(), threading.Event()
    sent: list[str] = []

    async def receive(body: str) -> str:
        sent.append(body)
        return "ok"

    def slow_claim() -> None:
        claiming.set()
        assert go_on.wait(30)

    outbox = MessagesOutbox(receive)
    outbox.claimed = slow_claim
    write(sessions, "claimed", wake=False)
    task = asyncio.ensure_future(relay(sessions, outbox).run())
    assert await asyncio.to_thread(claiming.wait, 30)
    task.cancel()
    await asyncio.sleep(0.05)  # the task takes the cancellation while the claim runs
    assert not task.done()
    go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sent == []
    assert pending(sessions) == [("claimed", 0, 1)]


@pytest.mark.anyio
async def test_sqlite_is_free_for_writers_while_a_round_sends(tmp_path: object) -> None:
    url = f"sqlite:///{tmp_path}/relay.db"
    engine = create_db_engine(url)
    metadata.create_all(engine)
    sessions = make_session_factory(engine)
    # A writer that would rather fail than wait for the lock.
    writer = create_engine(url, connect_args={"timeout": 0.2})
    wrote: list[bool] = []

    async def receive(body: str) -> str:
        def try_write() -> None:
            try:
                with writer.begin() as connection:
                    connection.execute(insert(REFUSED).values(body="x", reason="written"))
                wrote.append(True)
            except OperationalError:
                wrote.append(False)

        await anyio.to_thread.run_sync(try_write)
        return "ok"

    try:
        write(sessions, "one", wake=False)
        assert await relay(sessions, MessagesOutbox(receive)).deliver_pending() == 1
        assert wrote == [True]
    finally:
        writer.dispose()
        engine.dispose()


@pytest.mark.anyio
@pytest.mark.postgres
async def test_two_relays_on_one_postgresql_database_deliver_one_at_a_time_in_order(
    postgres_database: str,
) -> None:
    # Two processes' relays share the database, the receiver is slow, so their
    # rounds would overlap without the lock: each message arrives once, in order,
    # and never while another is being sent.
    engines = [create_db_engine(postgres_database) for _ in range(2)]
    metadata.create_all(engines[0])
    factories = [make_session_factory(engine) for engine in engines]
    bodies = [f"m{n:02d}" for n in range(30)]
    write(factories[0], *bodies, wake=False)
    received: list[str] = []
    in_flight = 0
    most_in_flight = 0

    async def slow(body: str) -> str:
        nonlocal in_flight, most_in_flight
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
        await anyio.sleep(0.005)
        received.append(body)
        in_flight -= 1
        return "ok"

    relays = [
        relay(factory, MessagesOutbox(slow, batch_size=4), poll_seconds=0.01)
        for factory in factories
    ]
    try:
        async with anyio.create_task_group() as tasks:
            for each in relays:
                tasks.start_soon(each.run)
            await eventually(lambda: not pending(factories[0]))
            tasks.cancel_scope.cancel()
    finally:
        for engine in engines:
            engine.dispose()
    assert received == bodies
    assert most_in_flight == 1
    # Which relay sends which round is up to the scheduler (one may win every
    # round), and the relays are stopped as soon as the outbox is empty, before
    # they count their last round: their counts are not part of the check.


@pytest.mark.anyio
async def test_a_relay_stops_whenever_it_is_cancelled(sessions: sessionmaker[Session]) -> None:
    # The receiver fails at once and the back-off is short, so the relay goes
    # through claims, sends, settlements, closes and sleeps all the time: a
    # cancellation landing in any of them ends the task.
    async def failing(body: str) -> str:
        return "receiver down"

    write(sessions, "stuck", wake=False)
    for attempt in range(40):
        task = asyncio.ensure_future(
            relay(sessions, MessagesOutbox(failing), backoff=Backoff(0.001, 0.001)).run()
        )
        await asyncio.sleep(0.002 * (attempt % 10))
        task.cancel()
        done, _ = await asyncio.wait((task,), timeout=10)
        assert done, f"attempt {attempt}: the relay did not stop"
        assert task.cancelled()
