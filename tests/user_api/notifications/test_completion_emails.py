"""Completion emails end to end: the user API's routes and status callback, its
background sender, and a local HTTP server standing in for Mailjet's v3.1 API."""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import select

from labcloud.contract import INTERNAL_API_KEY_HEADER
from labcloud.db import create_db_engine, make_session_factory
from tests.user_api.helpers import signup
from tests.waiting import wait_for
from user_api.app import create_app
from user_api.models import EmailOutbox, EmailStatus
from user_api.settings import EmailSenderService, UserApiSettings

SENDER = "labcloud@example.org"
API_KEY = "mj-public-key"
SECRET_KEY = "mj-secret-key"
FRONTEND = "https://labcloud.example.org"
USER = "ada@example.org"


@dataclass(frozen=True)
class Received:
    path: str
    authorization: str | None
    body: dict[str, Any]

    @property
    def message(self) -> dict[str, Any]:
        [message] = self.body["Messages"]
        assert isinstance(message, dict)
        return message


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


class FakeMailjet:
    """Records every request; answers the queued replies first, then success."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.replies: deque[Reply] = deque()
        self.delay = 0.0
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                with fake._lock:
                    fake.received.append(
                        Received(self.path, self.headers.get("Authorization"), body)
                    )
                    reply = fake.replies.popleft() if fake.replies else None
                time.sleep(fake.delay)
                if reply is None:
                    reply = Reply(200, {"Messages": [{"Status": "success"}]}, {})
                payload = json.dumps(reply.body).encode()
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/"

    def fail_next(self, count: int, status: int, **headers: str) -> None:
        body = {"ErrorMessage": f"stand-in failure {status}", "StatusCode": status}
        with self._lock:
            self.replies.extend(Reply(status, body, headers) for _ in range(count))

    def recover(self) -> None:
        """Drop the failures still queued: answer success from now on."""
        with self._lock:
            self.replies.clear()

    def subjects(self) -> list[str]:
        with self._lock:
            return [str(item.message["Subject"]) for item in self.received]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def mailjet() -> Iterator[FakeMailjet]:
    server = FakeMailjet()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def email_settings(user_settings: UserApiSettings, mailjet: FakeMailjet) -> UserApiSettings:
    return user_settings.model_copy(
        update={
            "email_sender_service": EmailSenderService.MAILJET,
            "email_sender_address": SENDER,
            "email_sender_api_key": API_KEY,
            "email_sender_secret_key": SecretStr(SECRET_KEY),
            "mailjet_api_url": mailjet.url,
            "frontend_url": FRONTEND,
            # Tiny poll and backoff: every retry happens within milliseconds.
            "email_poll_seconds": 0.02,
            "email_retry_max_seconds": 0.05,
            "email_max_attempts": 4,
        }
    )


@pytest.fixture
def email_client(email_settings: UserApiSettings) -> Iterator[TestClient]:
    with TestClient(create_app(email_settings)) as test_client:
        yield test_client


def wait_until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll ``condition`` (the outbox has no event to wait on) until it holds; the
    deadline only bounds a test that is failing, on a loaded machine."""
    wait_for(condition, timeout, interval=0.01)


def outbox(client: TestClient) -> list[EmailOutbox]:
    with client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        return list(session.scalars(select(EmailOutbox).order_by(EmailOutbox.id)))


def outbox_of(settings: UserApiSettings) -> list[EmailOutbox]:
    """The outbox read through an engine of its own (no app running)."""
    engine = create_db_engine(settings.resolved_database_url)
    try:
        with make_session_factory(engine)() as session:
            return list(session.scalars(select(EmailOutbox).order_by(EmailOutbox.id)))
    finally:
        engine.dispose()


def create_job(client: TestClient, headers: dict[str, str], name: str) -> int:
    body = {
        "job_name": name,
        "application": {"application": "demo", "version": "latest", "entrypoint": "wordcount"},
    }
    response = client.post("/jobs", json=body, headers=headers)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    assert isinstance(job_id, int)
    return job_id


def report(client: TestClient, job_id: int, status: str, details: str | None = None) -> bool:
    """What the worker API does: ``PUT /_job_status`` with the internal key."""
    settings: UserApiSettings = client.app.state.settings  # type: ignore[attr-defined]
    response = client.put(
        "/_job_status",
        json={"job_id": job_id, "status": status, "runtime_details": details},
        headers={INTERNAL_API_KEY_HEADER: settings.internal_api_key_secret.get_secret_value()},
    )
    assert response.status_code == 200, response.text
    return bool(response.json()["applied"])


def finish(
    client: TestClient, job_id: int, status: str = "finished", details: str | None = None
) -> None:
    assert report(client, job_id, "pulled")
    assert report(client, job_id, "running")
    assert report(client, job_id, status, details)


def job_status(client: TestClient, headers: dict[str, str], job_id: int) -> str:
    status = client.get(f"/jobs/{job_id}", headers=headers).json()["status"]
    assert isinstance(status, str)
    return status


def settle() -> None:
    """Give the sender many polls to do anything more it would wrongly do."""
    time.sleep(0.3)


def test_finished_job_sends_one_email(email_client: TestClient, mailjet: FakeMailjet) -> None:
    user = signup(email_client, USER)
    job_id = create_job(email_client, user, "run-1")
    finish(email_client, job_id)
    # The worker API may deliver a terminal status twice, or a late different one.
    assert not report(email_client, job_id, "finished")
    assert not report(email_client, job_id, "error", "late")

    wait_until(lambda: [row.status for row in outbox(email_client)] == ["sent"])
    settle()
    [request] = mailjet.received
    assert request.path == "/v3.1/send"
    credentials = base64.b64encode(f"{API_KEY}:{SECRET_KEY}".encode()).decode()
    assert request.authorization == f"Basic {credentials}"
    message = request.message
    assert message["From"]["Email"] == SENDER
    assert message["To"] == [{"Email": USER}]
    assert message["Subject"] == "LabCloud: job 'run-1' finished"
    assert f'<a href="{FRONTEND}/jobs/{job_id}">' in message["HTMLPart"]
    assert f"{FRONTEND}/jobs/{job_id}" in message["TextPart"]
    for part in (message["HTMLPart"], message["TextPart"]):
        assert "demo / latest / wordcount" in part
        assert "finished" in part
        assert "Duration" in part
    assert "End of the log" not in message["TextPart"]
    [row] = outbox(email_client)
    assert row.attempts == 1 and row.sent_at is not None and row.last_error is None


def test_failed_job_email_quotes_the_log_escaped(
    email_client: TestClient, mailjet: FakeMailjet
) -> None:
    user = signup(email_client, USER)
    job_id = create_job(email_client, user, "run-2")
    log = "starting\n<script>alert('x')</script>\nTom & Jerry <b>x</b>\nexit code 3"
    finish(email_client, job_id, "error", log)

    wait_until(lambda: len(mailjet.received) == 1)
    message = mailjet.received[0].message
    assert message["Subject"] == "LabCloud: job 'run-2' failed"
    html_part = message["HTMLPart"]
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html_part
    assert "Tom &amp; Jerry &lt;b&gt;x&lt;/b&gt;" in html_part
    assert "<script" not in html_part and "<b>x</b>" not in html_part
    # The plain-text part quotes the log as it is.
    assert "<script>alert('x')</script>" in message["TextPart"]
    assert "exit code 3" in message["TextPart"]


def test_failed_job_email_says_why_with_the_exit_code(
    email_client: TestClient, mailjet: FakeMailjet
) -> None:
    user = signup(email_client, USER)
    job_id = create_job(email_client, user, "run-exit")
    assert report(email_client, job_id, "running")
    settings: UserApiSettings = email_client.app.state.settings  # type: ignore[attr-defined]
    outcome = {"exit_code": 137, "failure": "user_error", "attempt": 1, "log_tail": "killed"}
    response = email_client.put(
        "/_job_status",
        json={"job_id": job_id, "status": "error", "runtime_details": "killed", "outcome": outcome},
        headers={INTERNAL_API_KEY_HEADER: settings.internal_api_key_secret.get_secret_value()},
    )
    assert response.status_code == 200 and response.json()["applied"], response.text

    wait_until(lambda: len(mailjet.received) == 1)
    message = mailjet.received[0].message
    for part in (message["TextPart"], message["HTMLPart"]):
        assert "Exit code" in part and "137" in part
        assert "the job&#x27;s program failed" in part or "the job's program failed" in part
    job = email_client.get(f"/jobs/{job_id}", headers=user).json()
    assert job["outcome"]["exit_code"] == 137 and job["outcome"]["failure"] == "user_error"


def test_canceled_job_sends_one_email(email_client: TestClient, mailjet: FakeMailjet) -> None:
    user = signup(email_client, USER)
    job_id = create_job(email_client, user, "run-3")
    response = email_client.post(f"/jobs/{job_id}/cancel", headers=user)
    assert response.json()["status"] == "canceled"
    # A second cancel is refused (the job has ended) and queues no second email.
    assert email_client.post(f"/jobs/{job_id}/cancel", headers=user).status_code == 409
    assert not report(email_client, job_id, "error", "the worker saw it late")

    wait_until(lambda: len(mailjet.received) == 1)
    settle()
    assert mailjet.subjects() == ["LabCloud: job 'run-3' was canceled"]
    # Deleting the canceled job afterwards sends nothing more.
    assert email_client.delete(f"/jobs/{job_id}", headers=user).status_code == 204
    settle()
    assert len(mailjet.received) == 1


def test_deleting_an_active_job_sends_nothing(
    email_client: TestClient, mailjet: FakeMailjet
) -> None:
    user = signup(email_client, USER)
    job_id = create_job(email_client, user, "scratch")
    assert report(email_client, job_id, "running")
    assert email_client.delete(f"/jobs/{job_id}", headers=user).status_code == 204
    settle()
    assert outbox(email_client) == []
    assert mailjet.received == []


def test_retries_on_429_and_5xx_then_sends(
    email_client: TestClient, mailjet: FakeMailjet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="user_api.notifications")
    mailjet.fail_next(1, 429, **{"Retry-After": "0"})
    mailjet.fail_next(1, 500)
    mailjet.fail_next(1, 503)
    user = signup(email_client, USER)
    job_id = create_job(email_client, user, "retried")
    finish(email_client, job_id)

    wait_until(lambda: [row.status for row in outbox(email_client)] == ["sent"])
    settle()
    assert len(mailjet.received) == 4
    assert {item.message["Subject"] for item in mailjet.received} == {
        "LabCloud: job 'retried' finished"
    }
    [row] = outbox(email_client)
    assert row.attempts == 4
    assert job_status(email_client, user, job_id) == "finished"
    retries = [r.getMessage() for r in caplog.records if r.name == "user_api.notifications.sender"]
    assert len(retries) == 3
    assert "429" in retries[0] and "500" in retries[1] and "503" in retries[2]


def test_gives_up_after_the_last_attempt(
    email_client: TestClient, mailjet: FakeMailjet, caplog: pytest.LogCaptureFixture
) -> None:
    mailjet.fail_next(10, 502)
    user = signup(email_client, USER)
    finish(email_client, create_job(email_client, user, "doomed"))

    wait_until(lambda: [row.status for row in outbox(email_client)] == ["failed"])
    settle()
    assert len(mailjet.received) == 4  # EMAIL_MAX_ATTEMPTS
    [row] = outbox(email_client)
    assert row.attempts == 4 and row.last_error is not None and "502" in row.last_error
    [given_up] = [r for r in caplog.records if "given up" in r.getMessage()]
    assert given_up.levelno == logging.ERROR


def test_bad_credentials_fail_at_once(
    email_client: TestClient, mailjet: FakeMailjet, caplog: pytest.LogCaptureFixture
) -> None:
    mailjet.fail_next(1, 401)
    user = signup(email_client, USER)
    job_id = create_job(email_client, user, "unauthorized")
    finish(email_client, job_id)

    wait_until(lambda: [row.status for row in outbox(email_client)] == ["failed"])
    settle()
    assert len(mailjet.received) == 1  # not retried
    [row] = outbox(email_client)
    assert row.attempts == 1 and row.last_error is not None and "401" in row.last_error
    [logged] = [
        r for r in caplog.records if r.levelno >= logging.WARNING and "401" in r.getMessage()
    ]
    assert logged.levelno == logging.ERROR
    assert f"job {job_id}" in logged.getMessage()
    assert "stand-in failure 401" in logged.getMessage()
    assert job_status(email_client, user, job_id) == "finished"


def test_mailjet_outage_leaves_the_job_status_alone(
    email_settings: UserApiSettings, mailjet: FakeMailjet
) -> None:
    # Nothing listens at MAILJET_API_URL: a port held by a socket that never
    # listens refuses connections, and no other test can start a server on it.
    mailjet.stop()
    refusing = socket.socket()
    refusing.bind(("127.0.0.1", 0))
    email_settings = email_settings.model_copy(
        update={
            "email_max_attempts": 1000,
            "mailjet_api_url": f"http://127.0.0.1:{refusing.getsockname()[1]}/",
        }
    )
    with refusing, TestClient(create_app(email_settings)) as client:
        user = signup(client, USER)
        job_id = create_job(client, user, "outage")
        finish(client, job_id)
        assert job_status(client, user, job_id) == "finished"
        wait_until(lambda: outbox(client)[0].attempts >= 2)
        [row] = outbox(client)
        assert row.status == EmailStatus.PENDING.value
        assert row.last_error is not None and "Connection" in row.last_error
    # Restarted once Mailjet is back, the pending email goes out.
    back = FakeMailjet()
    back.start()
    try:
        revived = email_settings.model_copy(update={"mailjet_api_url": back.url})
        with TestClient(create_app(revived)) as client:
            wait_until(lambda: [row.status for row in outbox(client)] == ["sent"])
        assert back.subjects() == ["LabCloud: job 'outage' finished"]
    finally:
        back.stop()


def test_opted_out_user_gets_no_email(email_client: TestClient, mailjet: FakeMailjet) -> None:
    user = signup(email_client, USER)
    assert email_client.get("/user/notifications", headers=user).json() == {
        "email_notifications": True
    }
    response = email_client.put(
        "/user/notifications", json={"email_notifications": False}, headers=user
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"email_notifications": False}
    assert email_client.get("/user/notifications", headers=user).json() == {
        "email_notifications": False
    }
    finish(email_client, create_job(email_client, user, "quiet"))
    email_client.post(f"/jobs/{create_job(email_client, user, 'quiet-2')}/cancel", headers=user)
    settle()
    assert outbox(email_client) == []
    assert mailjet.received == []

    # Another user's choice is their own.
    other = signup(email_client, "grace@example.org")
    assert email_client.get("/user/notifications", headers=other).json() == {
        "email_notifications": True
    }
    # Turned back on, the next job is announced.
    email_client.put("/user/notifications", json={"email_notifications": True}, headers=user)
    finish(email_client, create_job(email_client, user, "loud"))
    wait_until(lambda: len(mailjet.received) == 1)
    assert mailjet.subjects() == ["LabCloud: job 'loud' finished"]


def test_notification_settings_need_a_user_and_a_valid_body(email_client: TestClient) -> None:
    assert email_client.get("/user/notifications").status_code == 401
    user = signup(email_client, USER)
    for body in ({}, {"email_notifications": "maybe"}, {"email_notifications": True, "x": 1}):
        response = email_client.put("/user/notifications", json=body, headers=user)
        assert response.status_code == 422, body


def test_no_sender_service_writes_nothing_and_says_so(
    user_settings: UserApiSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="user_api")
    assert user_settings.email_sender_service is EmailSenderService.NONE
    with TestClient(create_app(user_settings)) as client:
        user = signup(client, USER)
        finish(client, create_job(client, user, "silent"))
        client.post(f"/jobs/{create_job(client, user, 'silent-2')}/cancel", headers=user)
        assert outbox(client) == []
        # The preference can still be set, for when emails are turned on.
        response = client.put(
            "/user/notifications", json={"email_notifications": False}, headers=user
        )
        assert response.json() == {"email_notifications": False}
    off = [r for r in caplog.records if "email notifications off" in r.getMessage()]
    assert [r.getMessage() for r in off] == [
        "email notifications off (EMAIL_SENDER_SERVICE is empty)"
    ]


def test_restart_sends_pending_emails_and_never_resends_sent_ones(
    email_settings: UserApiSettings, mailjet: FakeMailjet
) -> None:
    email_settings = email_settings.model_copy(update={"email_max_attempts": 1000})
    with TestClient(create_app(email_settings)) as client:
        user = signup(client, USER)
        finish(client, create_job(client, user, "before"))
        wait_until(lambda: [row.status for row in outbox(client)] == ["sent"])
        # Mailjet falls over: the next email stays pending across the restart.
        mailjet.fail_next(1000, 503)
        finish(client, create_job(client, user, "during"))
        wait_until(lambda: outbox(client)[1].attempts >= 1)
    rows = outbox_of(email_settings)
    assert [row.status for row in rows] == ["sent", "pending"]
    mailjet.recover()
    failed_tries = len(mailjet.received) - 1

    with TestClient(create_app(email_settings)) as client:
        wait_until(lambda: [row.status for row in outbox(client)] == ["sent", "sent"])
        settle()
    subjects = mailjet.subjects()
    assert subjects.count("LabCloud: job 'before' finished") == 1
    assert subjects.count("LabCloud: job 'during' finished") == failed_tries + 1


def test_shutdown_waits_for_the_email_in_flight(
    email_settings: UserApiSettings, mailjet: FakeMailjet
) -> None:
    mailjet.delay = 0.5
    with TestClient(create_app(email_settings)) as client:
        user = signup(client, USER)
        finish(client, create_job(client, user, "in-flight"))
        wait_until(lambda: len(mailjet.received) == 1)
    # Mailjet accepted it while the API was stopping: it is recorded as sent, so the
    # next start does not send it again.
    assert [row.status for row in outbox_of(email_settings)] == ["sent"]
    mailjet.delay = 0
    with TestClient(create_app(email_settings)):
        time.sleep(0.3)
    assert len(mailjet.received) == 1


def test_two_api_processes_never_send_the_same_email(
    email_settings: UserApiSettings, mailjet: FakeMailjet
) -> None:
    with (
        TestClient(create_app(email_settings)) as first,
        TestClient(create_app(email_settings)) as second,
    ):
        user = signup(first, USER)
        job_ids = [create_job(first, user, f"many-{i}") for i in range(12)]
        for job_id in job_ids:
            finish(second if job_id % 2 else first, job_id)
        wait_until(lambda: [row.status for row in outbox(first)] == ["sent"] * len(job_ids))
        settle()
    custom_ids = sorted(str(item.message["CustomID"]) for item in mailjet.received)
    assert custom_ids == sorted(f"labcloud-job-{job_id}" for job_id in job_ids)
