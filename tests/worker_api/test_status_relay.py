"""The status outbox's relay on SQLite and PostgreSQL: status changes written by
the queue's lifecycle, delivered to a stand-in user API (``httpx.MockTransport``)
in order, kept until acknowledged, woken by the commit that wrote them."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from labcloud.contract import Environment, FailureKind, JobStatus, Outcome
from labcloud.db import unit_of_work
from labcloud.outbox import Backoff, DeliveryFailed, Relay
from tests.worker_api.conftest import queue_job
from worker_api.clients.user_api import UserApiClient
from worker_api.models import StatusOutbox
from worker_api.queue import service
from worker_api.queue.policy import QueuePolicy, QueueSignals
from worker_api.queue.schemas import WorkerOffer
from worker_api.queue.status_relay import StatusMessage, UserApiStatusOutbox

POLICY = QueuePolicy(lease_seconds=60, max_retries=1)
WORKER = WorkerOffer(name="w1", environment=Environment.LOCAL, memory=8000)
KEY = "k" * 20

# Sync or async: ``httpx.MockTransport`` takes both.
Handler = Callable[[httpx.Request], Any]


def leased_queue_id(factory: sessionmaker[Session], job_id: int = 1) -> int:
    with unit_of_work(factory) as session:
        service.enqueue(session, queue_job(job_id), signals=QueueSignals())
    with unit_of_work(factory) as session:
        [leased] = service.lease_jobs(session, WORKER, policy=POLICY, limit=1, older_than=0)
        return leased.queue_id


def report(
    factory: sessionmaker[Session],
    queue_id: int,
    status: JobStatus,
    *,
    details: str | None = None,
    outcome: Outcome | None = None,
) -> None:
    with unit_of_work(factory) as session:
        service.report_status(
            session,
            queue_id,
            policy=POLICY,
            worker="w1",
            status=status,
            runtime_details=details,
            outcome=outcome,
        )


def outbox(factory: sessionmaker[Session]) -> list[tuple[int, str, str | None]]:
    with unit_of_work(factory) as session:
        return [
            (row.job_id, row.status.value, row.runtime_details)
            for row in session.scalars(select(StatusOutbox).order_by(StatusOutbox.id))
        ]


def status_relay(
    factory: sessionmaker[Session], client: httpx.AsyncClient, *, poll_seconds: float = 0.05
) -> Relay[StatusMessage]:
    user_api = UserApiClient(client, user_api_url="http://user-api/", api_key=KEY)
    return Relay(
        UserApiStatusOutbox(user_api),
        factory,
        poll_seconds=poll_seconds,
        backoff=Backoff(first_seconds=0.01, max_seconds=0.05),
    )


def mock(handler: Handler) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait until ``condition`` holds; the deadline only bounds a failing test."""
    with anyio.fail_after(30):
        while not condition():  # noqa: ASYNC110 (the database has no event to wait on)
            await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_statuses_arrive_in_order_with_their_outcome_and_failures_are_retried(
    factory: sessionmaker[Session],
) -> None:
    queue_id = leased_queue_id(factory)
    report(factory, queue_id, JobStatus.RUNNING)
    ended = Outcome(exit_code=3, failure=FailureKind.USER_ERROR)
    report(factory, queue_id, JobStatus.ERROR, details="boom", outcome=ended)
    answers = [503, 500]
    seen: list[tuple[str, str, dict[str, object]]] = []

    def user_api(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, str(request.url), json.loads(request.content)))
        assert request.headers["x-api-key"] == KEY
        if answers:
            return httpx.Response(answers.pop(0))
        return httpx.Response(204)

    async with mock(user_api) as client, anyio.create_task_group() as tasks:
        tasks.start_soon(status_relay(factory, client).run)
        await eventually(lambda: not outbox(factory))
        tasks.cancel_scope.cancel()
    delivered = [body["status"] for _method, _url, body in seen]
    # Each failure was retried with the same (first) row: order is kept.
    assert delivered == ["pulled", "pulled", "pulled", "running", "error"]
    method, url, body = seen[-1]
    assert (method, url) == ("PUT", "http://user-api/_job_status")
    assert {key: body[key] for key in ("job_id", "status", "runtime_details")} == {
        "job_id": 1,
        "status": "error",
        "runtime_details": "boom",
    }
    outcome = body["outcome"]
    assert isinstance(outcome, dict)
    assert (outcome["exit_code"], outcome["failure"]) == (3, "user_error")
    assert seen[0][2]["outcome"] is None


@pytest.mark.anyio
async def test_rows_stay_until_acknowledged(factory: sessionmaker[Session]) -> None:
    leased_queue_id(factory)

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with mock(down) as client:
        with pytest.raises(DeliveryFailed, match="cannot reach the user API"):
            await status_relay(factory, client).deliver_pending()
    assert outbox(factory) == [(1, "pulled", None)]

    # A refusal does not drop a status either: it stays first in line.
    async with mock(lambda _request: httpx.Response(422, json={"detail": "?"})) as client:
        with pytest.raises(DeliveryFailed, match="answered 422 to the status of job 1"):
            await status_relay(factory, client).deliver_pending()
    assert outbox(factory) == [(1, "pulled", None)]

    # A job deleted on the user API answers 404: nothing left to tell, the row goes.
    async with mock(lambda _request: httpx.Response(404)) as client:
        assert await status_relay(factory, client).deliver_pending() == 1
    assert outbox(factory) == []


@pytest.mark.anyio
async def test_a_status_change_is_sent_at_once_after_its_commit(
    factory: sessionmaker[Session],
) -> None:
    arrived: dict[str, float] = {}

    def user_api(request: httpx.Request) -> httpx.Response:
        arrived.setdefault(json.loads(request.content)["status"], time.monotonic())
        return httpx.Response(204)

    queue_id = leased_queue_id(factory)
    async with mock(user_api) as client, anyio.create_task_group() as tasks:
        # Polling only every minute: the commit that wrote the row wakes the relay.
        tasks.start_soon(status_relay(factory, client, poll_seconds=60).run)
        await eventually(lambda: "pulled" in arrived)

        def report_running() -> float:
            report(factory, queue_id, JobStatus.RUNNING)
            return time.monotonic()

        # Reported from another thread, as the sync endpoint does.
        committed = await anyio.to_thread.run_sync(report_running)
        await eventually(lambda: "running" in arrived)
        tasks.cancel_scope.cancel()
    assert arrived["running"] - committed < 10  # far under the poll interval
    assert outbox(factory) == []


@pytest.mark.anyio
@pytest.mark.postgres
async def test_relays_of_several_processes_deliver_each_row_once_in_order(
    postgres_factory: sessionmaker[Session],
) -> None:
    # Three worker API processes share the database; the user API is slow, so
    # their deliveries would overlap. Every change arrives once, in order.
    factory = postgres_factory
    for job_id in range(1, 6):
        queue_id = leased_queue_id(factory, job_id)
        report(factory, queue_id, JobStatus.PREPROCESSING)
        report(factory, queue_id, JobStatus.RUNNING)
        report(factory, queue_id, JobStatus.FINISHED)
    written = [(job_id, status) for job_id, status, _details in outbox(factory)]
    received: list[tuple[int, str]] = []

    async def slow_user_api(request: httpx.Request) -> httpx.Response:
        await anyio.sleep(0.01)
        body = json.loads(request.content)
        received.append((body["job_id"], body["status"]))
        return httpx.Response(204)

    clients = [mock(slow_user_api) for _ in range(3)]
    relays = [status_relay(factory, client, poll_seconds=0.01) for client in clients]
    async with anyio.create_task_group() as tasks:
        for relay in relays:
            tasks.start_soon(relay.run)
        await eventually(lambda: not outbox(factory))
        await anyio.sleep(0.1)
        tasks.cancel_scope.cancel()
    for client in clients:
        await client.aclose()
    assert len(written) == 20
    assert received == written
