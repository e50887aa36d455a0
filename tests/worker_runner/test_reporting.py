"""Status reporting (``worker_runner.reporting``): phases in order, keep-alives,
the final report with its outcome as the JSON body."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import httpx

from labcloud.contract import FailureKind, JobStatus, Outcome
from tests.worker_runner.conftest import FakeWorkerApi, wait_for
from worker_runner.client import WorkerApiClient
from worker_runner.reporting import FinalReport, StatusReporter, runtime_details


def test_a_phase_missed_while_the_api_is_away_is_sent_before_the_next(
    api: FakeWorkerApi, client: WorkerApiClient
) -> None:
    """The API is away when ``postprocessing`` starts and back when the job ends:
    ``postprocessing`` still arrives, before ``finished``."""
    reporter = StatusReporter(client, "q1", interval=3600)  # no keep-alive in between
    reporter.set(JobStatus.RUNNING)
    api.status_unreachable = True
    reporter.set(JobStatus.POSTPROCESSING)
    api.status_unreachable = False
    reporter.finish(FinalReport(JobStatus.FINISHED))
    assert api.statuses_of("q1") == ["running", "postprocessing", "finished"]


def test_the_keep_alive_delivers_a_missed_phase_in_order(
    api: FakeWorkerApi, client: WorkerApiClient
) -> None:
    with StatusReporter(client, "q1", interval=0.05) as reporter:
        reporter.set(JobStatus.PREPROCESSING)
        api.status_unreachable = True
        reporter.set(JobStatus.RUNNING)
        time.sleep(0.1)  # keep-alives fail meanwhile
        api.status_unreachable = False
        wait_for(lambda: api.statuses_of("q1") == ["preprocessing", "running"])
    # A phase the API refuses for good is not sent again.
    api.refused_statuses.add("postprocessing")
    reporter.set(JobStatus.POSTPROCESSING)
    reporter.finish(FinalReport(JobStatus.FINISHED))
    assert api.statuses_of("q1") == ["preprocessing", "running", "finished"]


def test_runtime_details_fit_in_a_query_parameter() -> None:
    tail = "\n".join("é%&" * 40 for _ in range(40))
    text = runtime_details("exit code 1", tail, max_encoded=2000)
    assert text.startswith("exit code 1\n")
    assert len(httpx.QueryParams({"d": text}).__str__()) <= 2100
    assert tail.endswith(text.split("\n", 1)[1])


def test_the_final_report_carries_its_outcome_as_the_body(
    api: FakeWorkerApi, client: WorkerApiClient
) -> None:
    reporter = StatusReporter(client, "q1", interval=3600)
    reporter.set(JobStatus.RUNNING)
    started = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    outcome = Outcome(
        exit_code=2,
        failure=FailureKind.USER_ERROR,
        started_at=started,
        ended_at=started.replace(minute=5),
        log_tail="boom",
    )
    reporter.finish(FinalReport(JobStatus.ERROR, "exit code 2\nboom", outcome))
    assert api.final("q1") == ("error", "exit code 2\nboom")
    # Set fields only: the worker API completes the attempt number.
    assert api.reports["q1"] == [
        {
            "outcome": {
                "exit_code": 2,
                "failure": "user_error",
                "started_at": "2024-05-01T12:00:00Z",
                "ended_at": "2024-05-01T12:05:00Z",
                "log_tail": "boom",
            }
        }
    ]


def test_a_status_without_outcome_has_no_body(api: FakeWorkerApi, client: WorkerApiClient) -> None:
    # Phases, keep-alives and a hand-back are DECODE's plain query-parameter reports.
    with StatusReporter(client, "q1", interval=0.02) as reporter:
        reporter.set(JobStatus.RUNNING)
        time.sleep(0.1)
    reporter.finish(FinalReport(JobStatus.QUEUED))
    assert api.statuses_of("q1") == ["running", "queued"]
    assert "q1" not in api.reports
