"""The queue under stress with real processes, the real Docker engine and real
databases: cancellation at each phase, time limits, a runner killed with ``kill -9``
in the middle of a job, and both APIs restarted while jobs flow.

Every status change the worker API applies writes a row to its ``status_outbox``
in the same transaction. Each stack here gets a trigger in the queue database that
journals those rows, and the tests compare that journal, job by job, with the
transitions the user API applied (its "job N is now S" log lines): a status lost,
delivered twice or out of order between the two databases shows as a difference."""

from __future__ import annotations

import contextlib
import re
import secrets
import signal
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from labcloud_cli.images import ensure_demo_image
from tests.databases import temporary_postgres_database
from tests.e2e.stack import Process, Stack, wait_ready
from tests.waiting import wait_for
from worker_runner.job import LABEL_JOB_ID, LABEL_WORKER

pytestmark = [pytest.mark.docker, pytest.mark.e2e]
CATALOG = Path(__file__).resolve().parents[1] / "data" / "application_config.yaml"
PROGRESS = ["pulled", "preprocessing", "running", "postprocessing", "finished"]
APPLIED = re.compile(r"job (\d+) is now (\w+)")
IGNORED = re.compile(r"job (\d+): ignored (\w+)")


# -- helpers -------------------------------------------------------------------


def _email() -> str:
    return f"user-{secrets.token_hex(4)}@example.org"


def _submit(client: httpx.Client, name: str, entrypoint: str, **env: str) -> int:
    attributes: dict[str, Any] = {"env_vars": env} if env else {}
    response = client.post(
        "/jobs",
        json={
            "job_name": name,
            "application": {"application": "testing", "version": "1.0", "entrypoint": entrypoint},
            "attributes": attributes,
        },
    )
    assert response.status_code == 201, response.text
    job_id: int = response.json()["id"]
    return job_id


def _job(client: httpx.Client, job_id: int) -> dict[str, Any]:
    response = client.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


def _wait_status(
    client: httpx.Client, job_id: int, statuses: set[str], timeout: float
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        job = _job(client, job_id)
        return job if job["status"] in statuses else None

    found: dict[str, Any] = wait_for(
        reached, timeout=timeout, interval=0.05, what=f"job {job_id} to reach {statuses}"
    )
    return found


def _containers(**labels: str) -> list[Any]:
    """Containers, running or not, carrying all of ``labels``. Sparse: read from the
    list alone, since a container may be removed before a second look."""
    engine = docker.from_env()
    try:
        return list(
            engine.containers.list(
                all=True,
                sparse=True,
                filters={"label": [f"{key}={value}" for key, value in labels.items()]},
            )
        )
    finally:
        engine.close()


def _account(runner: Process) -> str:
    return runner.env["USERNAME"]


def _applied(stack: Stack) -> dict[int, list[str]]:
    """Per job, the transitions the user API applied, in order."""
    applied: dict[int, list[str]] = defaultdict(list)
    for match in APPLIED.finditer(stack.user_api.log()):
        applied[int(match[1])].append(match[2])
    return applied


def _ignored(stack: Stack) -> dict[int, list[str]]:
    """Per job, the status updates the user API received but did not apply."""
    ignored: dict[int, list[str]] = defaultdict(list)
    for match in IGNORED.finditer(stack.user_api.log()):
        ignored[int(match[1])].append(match[2])
    return ignored


def _query(url: str, sql: str, **params: Any) -> list[Any]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            return list(connection.execute(text(sql), params))
    finally:
        engine.dispose()


def _queue_status(stack: Stack, job_id: int) -> str | None:
    """The job's status in the worker API's queue; None before it arrives there."""
    rows = _query(stack.queue_db, "SELECT status FROM queued_jobs WHERE job_id = :id", id=job_id)
    return str(rows[0][0]) if rows else None


def _install_journal(queue_db: str) -> None:
    """Journal every row written to the worker API's status outbox (every status
    change it applied), surviving the outbox's deletes."""
    engine = create_engine(queue_db, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            if engine.dialect.name == "postgresql":
                statements = [
                    "CREATE TABLE test_status_journal (id BIGSERIAL PRIMARY KEY, "
                    "job_id INTEGER NOT NULL, status VARCHAR(16) NOT NULL)",
                    "CREATE FUNCTION test_status_journal_add() RETURNS trigger "
                    "LANGUAGE plpgsql AS $$ BEGIN INSERT INTO test_status_journal "
                    "(job_id, status) VALUES (NEW.job_id, NEW.status); RETURN NEW; END $$",
                    "CREATE TRIGGER test_status_journal_add AFTER INSERT ON status_outbox "
                    "FOR EACH ROW EXECUTE FUNCTION test_status_journal_add()",
                ]
            else:
                statements = [
                    "CREATE TABLE test_status_journal (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                    "job_id INTEGER NOT NULL, status VARCHAR(16) NOT NULL)",
                    "CREATE TRIGGER test_status_journal_add AFTER INSERT ON status_outbox "
                    "BEGIN INSERT INTO test_status_journal (job_id, status) "
                    "VALUES (NEW.job_id, NEW.status); END",
                ]
            for statement in statements:
                connection.execute(text(statement))
    finally:
        engine.dispose()


def _journal(queue_db: str) -> dict[int, list[str]]:
    """Per job, the status changes the worker API applied, in order."""
    journal: dict[int, list[str]] = defaultdict(list)
    for job_id, status in _query(
        queue_db, "SELECT job_id, status FROM test_status_journal ORDER BY id"
    ):
        journal[int(job_id)].append(str(status))
    return journal


def _outboxes_empty(stack: Stack) -> bool:
    pending_statuses = int(_query(stack.queue_db, "SELECT count(*) FROM status_outbox")[0][0])
    pending_messages = int(_query(stack.user_db, "SELECT count(*) FROM worker_outbox")[0][0])
    return pending_statuses == 0 and pending_messages == 0


def _check_every_transition_delivered_once(stack: Stack, job_ids: list[int]) -> None:
    """Each job's transitions, as applied by the worker API, reached the user API
    exactly once each and in the same order."""
    wait_for(lambda: _outboxes_empty(stack), timeout=20, what="both outboxes to drain")
    journal = _journal(stack.queue_db)
    applied = _applied(stack)
    for job_id in job_ids:
        assert applied[job_id] == journal[job_id], (
            f"job {job_id}: the worker API applied {journal[job_id]} but the user API "
            f"applied {applied[job_id]}"
        )


@contextlib.contextmanager
def _running_stack(
    root: Path,
    *,
    runners: int,
    databases: str = "sqlite",
    admin_url: str | None = None,
    worker_env: dict[str, str] | None = None,
) -> Iterator[Stack]:
    """A started stack with the status journal installed; its logs are printed when
    the block fails."""
    ensure_demo_image(docker.from_env())
    with contextlib.ExitStack() as resources:
        urls: dict[str, str] = {}
        if databases == "postgresql":
            assert admin_url is not None
            for name in ("user_db", "queue_db"):
                urls[name] = resources.enter_context(temporary_postgres_database(admin_url))
        stack = Stack(root, CATALOG, **urls)
        stack.worker_api.env.update(worker_env or {})
        try:
            stack.start(runners=runners)
            _install_journal(stack.queue_db)
            yield stack
        except BaseException:
            print(stack.logs())
            raise
        finally:
            stack.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One runner on SQLite, shared by the cancellation and time-limit tests."""
    with _running_stack(tmp_path_factory.mktemp("resilience"), runners=1) as running:
        yield running


# -- cancellation --------------------------------------------------------------


def test_cancel_queued_job_withdraws_it(stack: Stack) -> None:
    """With no runner up, a job waits in the worker API's queue; cancelled there, it
    is never pulled once a runner is back."""
    runner = stack.runners[0]
    with stack.user(_email()) as client:
        runner.stop()
        try:
            job_id = _submit(client, "waits", "nap")
            wait_for(
                lambda: _queue_status(stack, job_id) == "queued",
                timeout=10,
                what="the job to reach the worker API's queue",
            )
            response = client.post(f"/jobs/{job_id}/cancel")
            assert response.status_code == 200, response.text
            assert response.json()["status"] == "canceled"
            wait_for(
                lambda: _queue_status(stack, job_id) == "canceled",
                timeout=10,
                what="the worker API to cancel the queued job",
            )
        finally:
            runner.start()
        # A runner that is back runs the next job and never the canceled one.
        later = _submit(client, "after-cancel", "noop")
        assert _wait_status(client, later, {"finished", "error"}, 60)["status"] == "finished"
        assert _job(client, job_id)["status"] == "canceled"
        assert _applied(stack)[job_id] == []
        assert not _containers(**{LABEL_JOB_ID: str(job_id), LABEL_WORKER: stack.worker})


def test_cancel_running_job_stops_container_and_keeps_partial_log(stack: Stack) -> None:
    """Cancelling a running job stops its container within seconds, keeps the log
    written so far, and nothing the runner reports afterwards moves the job."""
    with stack.user(_email()) as client:
        job_id = _submit(client, "long-sleep", "sleep")
        labels = {LABEL_JOB_ID: str(job_id), LABEL_WORKER: stack.worker}
        _wait_status(client, job_id, {"running"}, 60)
        wait_for(
            lambda: any(c.status == "running" for c in _containers(**labels)),
            timeout=30,
            what="the job's container to run",
        )
        # The container has said something before it is stopped.
        time.sleep(0.5)

        canceled_at = time.monotonic()
        response = client.post(f"/jobs/{job_id}/cancel")
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "canceled"
        wait_for(lambda: not _containers(**labels), timeout=15, what="the container to go")
        removed_after = time.monotonic() - canceled_at
        print(f"container removed {removed_after:.2f} s after the cancel")
        assert removed_after < 5

        def partial_log() -> str | None:
            answer = client.get("/files/log/long-sleep/log.txt/download")
            return answer.text if answer.status_code == 200 else None

        log = wait_for(partial_log, timeout=15, what="the partial log in log/long-sleep")
        assert "sleeping" in log
        # The runner's last reports never move a canceled job.
        time.sleep(1.5)
        job = _job(client, job_id)
        assert job["status"] == "canceled"
        assert _applied(stack)[job_id] == ["pulled", "preprocessing", "running"]
        assert _queue_status(stack, job_id) == "canceled"


def test_cancel_after_finish_changes_nothing(stack: Stack) -> None:
    """Cancelling a finished job is refused (409) and changes nothing, results included."""
    with stack.user(_email()) as client:
        job_id = _submit(client, "done", "nap", NAP_SECONDS="0")
        finished = _wait_status(client, job_id, {"finished", "error"}, 60)
        assert finished["status"] == "finished"

        response = client.post(f"/jobs/{job_id}/cancel")
        assert response.status_code == 409, response.text
        assert "already ended (status finished)" in response.json()["detail"]
        time.sleep(0.5)
        assert _job(client, job_id) == finished
        log = client.get("/files/log/done/log.txt/download")
        assert log.status_code == 200 and "awake" in log.text
        assert _applied(stack)[job_id] == PROGRESS
        assert _queue_status(stack, job_id) == "finished"


# -- time limit ----------------------------------------------------------------


def test_catalog_timeout_stops_the_run_with_an_error(stack: Stack) -> None:
    """The catalog's ``timeout`` (2 s here) stops a local run: ``error``, saying so."""
    with stack.user(_email()) as client:
        job_id = _submit(client, "too-long", "overrun")
        labels = {LABEL_JOB_ID: str(job_id), LABEL_WORKER: stack.worker}
        running = _wait_status(client, job_id, {"running", "error", "finished"}, 60)
        started = time.monotonic()
        job = _wait_status(client, job_id, {"finished", "error", "canceled"}, 30)
        assert running["status"] == "running"
        assert job["status"] == "error", job
        assert "timed out after 2 s" in job["runtime_details"]
        assert "started" in job["runtime_details"]  # the log tail
        # The limit is 2 s; stopping with init takes a fraction of a second.
        assert time.monotonic() - started < 12
        wait_for(lambda: not _containers(**labels), timeout=10, what="the container to go")


# -- crash of a runner ---------------------------------------------------------


def test_runner_killed_mid_job_is_replaced_and_cleans_up_on_restart(tmp_path: Path) -> None:
    """``kill -9`` of a runner whose container runs: once its lease runs out
    (``TIMEOUT_FAILURE`` 3 s) the job is re-queued and a second runner, with its own
    account, completes it; the killed runner, started again, removes the container
    and job folder its first life left behind (found by their labels and marker)."""
    with _running_stack(
        tmp_path,
        runners=0,
        worker_env={"TIMEOUT_FAILURE": "3", "REAPER_INTERVAL_SECONDS": "0.5", "MAX_RETRIES": "2"},
    ) as stack:
        first = stack.add_runner("alpha")
        with stack.user(_email()) as client:
            job_id = _submit(client, "survivor", "nap", NAP_SECONDS="6")
            left_behind = {LABEL_JOB_ID: str(job_id), LABEL_WORKER: _account(first)}
            _wait_status(client, job_id, {"running"}, 60)
            wait_for(
                lambda: any(c.status == "running" for c in _containers(**left_behind)),
                timeout=30,
                what="the first runner's container",
            )
            first.kill()
            killed_at = time.monotonic()
            second = stack.add_runner("beta")

            job = _wait_status(client, job_id, {"finished", "error", "canceled"}, 60)
            assert job["status"] == "finished", job
            print(f"finished {time.monotonic() - killed_at:.1f} s after the kill")
            # The second attempt ran on the second runner; the first runner's
            # container is still there, nobody having removed it.
            assert _containers(**left_behind)
            wait_for(
                lambda: (
                    not _containers(**{LABEL_JOB_ID: str(job_id), LABEL_WORKER: _account(second)})
                ),
                timeout=10,
                what="the second runner to remove its container",
            )
            journal = _journal(stack.queue_db)[job_id]
            assert journal == ["pulled", "preprocessing", "running", "queued", *PROGRESS]
            _check_every_transition_delivered_once(stack, [job_id])

            first.start()
            wait_for(
                lambda: not _containers(**left_behind),
                timeout=30,
                what="the restarted runner to remove its leftover container",
            )
            folders = stack.root / "jobs-alpha"
            wait_for(
                lambda: not any(path.is_dir() for path in folders.iterdir()),
                timeout=10,
                what="the restarted runner to remove its leftover job folder",
            )


# -- the reaper ----------------------------------------------------------------


class _HandWorker:
    """The worker protocol driven step by step over HTTP, so that a test can fall
    silent at an exact phase: pull, report, upload a result, then stop talking."""

    def __init__(self, stack: Stack) -> None:
        self._client = httpx.Client(
            base_url=stack.worker_url, headers=stack.token(stack.worker), timeout=30
        )

    def close(self) -> None:
        self._client.close()

    def pull(self) -> str:
        response = self._client.get("/jobs", params={"memory": 8000, "wait": 5})
        assert response.status_code == 200, response.text
        [queue_id] = response.json()
        return str(queue_id)

    def report(self, queue_id: str, status: str) -> int:
        response = self._client.put(f"/jobs/{queue_id}/status", params={"status": status})
        return response.status_code

    def upload(self, queue_id: str, folder: str, name: str) -> None:
        response = self._client.post(
            f"/jobs/{queue_id}/files/upload",
            params={"type": "output", "base_path": folder},
            files={"file": (name, f"{name} of {folder}\n".encode())},
        )
        assert response.status_code == 201, response.text


def _result_files(stack: Stack, job_name: str) -> list[str]:
    """The job's stored output files, relative to its output folder."""
    folders = list((stack.root / "data").glob(f"*/output/{job_name}"))
    return sorted(
        str(path.relative_to(folder))
        for folder in folders
        for path in folder.rglob("*")
        if path.is_file()
    )


@pytest.mark.parametrize(
    "databases", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_reaped_jobs_are_rerun_from_scratch_or_failed_as_the_user_sees(
    request: pytest.FixtureRequest, tmp_path: Path, databases: str
) -> None:
    """Two jobs' worker falls silent (``TIMEOUT_FAILURE`` 4 s): one while running,
    after uploading a partial result, the other while uploading. The first is shown
    ``queued`` to its owner with the attempt and the reason, its partial result is
    gone before attempt 2 can start, and attempt 2 finishes with only its own
    results; the second may not move back and ends ``error`` saying why. The user
    API applies every status the worker API applied, none ignored."""
    admin_url = request.getfixturevalue("postgres_admin_url") if databases == "postgresql" else None
    with (
        _running_stack(
            tmp_path,
            runners=0,
            databases=databases,
            admin_url=admin_url,
            worker_env={
                "TIMEOUT_FAILURE": "4",
                "REAPER_INTERVAL_SECONDS": "0.2",
                "MAX_RETRIES": "1",
            },
        ) as stack,
        stack.user(_email()) as client,
    ):
        worker = _HandWorker(stack)
        try:
            rerun = _submit(client, "rerun", "nap")
            first = worker.pull()
            assert worker.report(first, "running") == 204
            worker.upload(first, "attempt-1", "partial.txt")
            uploading = _submit(client, "uploading", "nap")
            second = worker.pull()
            assert worker.report(second, "running") == 204
            assert worker.report(second, "postprocessing") == 204
            worker.upload(second, "attempt-1", "result.txt")
            assert _result_files(stack, "rerun") and _result_files(stack, "uploading")
            # The worker now falls silent on both jobs.

            queued = _wait_status(client, rerun, {"queued"}, 60)
            assert queued["runtime_details"] == (
                f"worker {stack.worker} sent no keep-alive for 4 s (attempt 1 of 2, running); "
                "re-queued for attempt 2 of 2"
            )
            # Deleted before the job went back to the queue.
            assert _result_files(stack, "rerun") == []
            failed = _wait_status(client, uploading, {"error", "finished", "canceled"}, 60)
            assert failed["status"] == "error"
            assert failed["runtime_details"] == (
                f"worker {stack.worker} sent no keep-alive for 4 s "
                "(attempt 1 of 2, postprocessing); giving up: it had started uploading its "
                "results, so it is not run again"
            )
            assert _result_files(stack, "uploading") != []  # kept for its owner
            assert worker.report(first, "running") == 404  # too late: abandon
            assert worker.report(second, "finished") == 404

            again = worker.pull()
            assert again == first
            for status in ("preprocessing", "running", "postprocessing"):
                assert worker.report(again, status) == 204
            worker.upload(again, "attempt-2", "final.txt")
            assert worker.report(again, "finished") == 204
            assert _wait_status(client, rerun, {"finished"}, 60)["status"] == "finished"
            assert [name.split("/")[0] for name in _result_files(stack, "rerun")] == ["attempt-2"]
        finally:
            worker.close()
        _check_every_transition_delivered_once(stack, [rerun, uploading])
        assert _applied(stack)[rerun] == [
            "pulled",
            "running",
            "queued",
            "pulled",
            "preprocessing",
            "running",
            "postprocessing",
            "finished",
        ]
        assert _applied(stack)[uploading] == ["pulled", "running", "postprocessing", "error"]
        assert not _ignored(stack)[rerun] and not _ignored(stack)[uploading]


# -- restarts of the APIs ------------------------------------------------------


OUTAGE_S = 5.0
"""How long each API stays away: longer than a runner's retries of one request."""


def _outage(
    stack: Stack, process: Process, sig: signal.Signals, during: Callable[[], None]
) -> None:
    """Stop ``process`` with ``sig``, run ``during``, and bring it back once
    ``OUTAGE_S`` seconds have passed."""
    url = stack.user_url if process is stack.user_api else stack.worker_url
    stopped_at = time.monotonic()
    process.stop(sig)
    during()
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped_at)))
    process.start()
    wait_ready(url, process)
    print(f"{process.name} back after {time.monotonic() - stopped_at:.1f} s")


@pytest.mark.parametrize(
    ("databases", "sig"),
    [
        pytest.param("sqlite", signal.SIGTERM, id="sqlite-stopped"),
        pytest.param(
            "postgresql", signal.SIGKILL, id="postgresql-killed", marks=pytest.mark.postgres
        ),
    ],
)
def test_api_outages_lose_and_duplicate_nothing(
    request: pytest.FixtureRequest, tmp_path: Path, databases: str, sig: signal.Signals
) -> None:
    """Each API goes away for a few seconds while a job runs: jobs and statuses wait
    in the outboxes, the runner waits for the worker API, and every job ends
    ``finished`` with each of its transitions applied once on both sides."""
    admin_url = request.getfixturevalue("postgres_admin_url") if databases == "postgresql" else None
    with (
        _running_stack(tmp_path, runners=1, databases=databases, admin_url=admin_url) as stack,
        stack.user(_email()) as client,
    ):
        job_ids = [_submit(client, f"early-{index}", "nap") for index in range(6)]

        def count(status: str) -> int:
            return sum(_job(client, job_id)["status"] == status for job_id in job_ids)

        def submit_more() -> None:
            # The user API keeps these in its outbox until the worker API is back.
            job_ids.extend(_submit(client, f"late-{index}", "nap") for index in range(4))

        wait_for(lambda: count("finished") >= 1 and count("running"), timeout=60, what="a run")
        _outage(stack, stack.worker_api, sig, submit_more)
        wait_for(lambda: count("finished") >= 4 and count("running"), timeout=60, what="a run")
        _outage(stack, stack.user_api, sig, lambda: None)

        terminal = {"finished", "error", "canceled"}
        wait_for(
            lambda: all(_job(client, job_id)["status"] in terminal for job_id in job_ids),
            timeout=90,
            what="every job to end",
        )
        ends = {job_id: _job(client, job_id) for job_id in job_ids}
        failed = {job_id: job for job_id, job in ends.items() if job["status"] != "finished"}
        assert not failed, failed

        _check_every_transition_delivered_once(stack, job_ids)
        # No phase went unreported while the worker API was away.
        journal = _journal(stack.queue_db)
        skipped = {job_id: journal[job_id] for job_id in job_ids if journal[job_id] != PROGRESS}
        assert not skipped, skipped
        repeats = {job_id: seen for job_id, seen in _ignored(stack).items() if seen}
        print(f"repeated deliveries, ignored by the user API: {repeats}")
        assert not _containers(**{LABEL_WORKER: stack.worker})
