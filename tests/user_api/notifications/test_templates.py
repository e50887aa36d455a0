from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from labcloud.contract import JobStatus
from user_api.notifications.templates import (
    LOG_TAIL_CHARS,
    LOG_TAIL_LINES,
    JobFacts,
    format_duration,
    log_tail,
    render_completion_email,
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def _job(**changes: object) -> JobFacts:
    values: dict[str, object] = {
        "id": 7,
        "name": "run-7",
        "application": "demo",
        "version": "latest",
        "entrypoint": "wordcount",
        "status": JobStatus.FINISHED,
        "date_created": T0,
        "date_started": T0 + timedelta(seconds=30),
        "date_finished": T0 + timedelta(minutes=4, seconds=42),
        "runtime_details": None,
    }
    values.update(changes)
    return JobFacts(**values)  # type: ignore[arg-type]


def test_finished_job_email() -> None:
    email = render_completion_email(_job(), frontend_url="https://lab.example.org/")
    assert email.subject == "LabCloud: job 'run-7' finished"
    for part in (email.text, email.html):
        assert "run-7 (#7)" in part
        assert "demo / latest / wordcount" in part
        assert "4 min 12 s" in part  # from the start, not from the submission
        assert "https://lab.example.org/jobs/7" in part
        assert "End of the log" not in part


@pytest.mark.parametrize(
    ("status", "subject"),
    [
        (JobStatus.ERROR, "LabCloud: job 'run-7' failed"),
        (JobStatus.CANCELED, "LabCloud: job 'run-7' was canceled"),
    ],
)
def test_subject_says_how_the_job_ended(status: JobStatus, subject: str) -> None:
    assert render_completion_email(_job(status=status), frontend_url=None).subject == subject


def test_every_value_is_escaped_in_the_html_part() -> None:
    job = _job(
        name="<b>x</b>",
        application="a&b",
        version='"v"',
        entrypoint="<i>e</i>",
        status=JobStatus.ERROR,
        runtime_details="<script>alert(1)</script>",
    )
    email = render_completion_email(job, frontend_url="https://lab.example.org/?a=1&b=<2>")
    assert "<b>x</b>" not in email.html and "&lt;b&gt;x&lt;/b&gt;" in email.html
    assert "a&amp;b / &quot;v&quot; / &lt;i&gt;e&lt;/i&gt;" in email.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in email.html
    assert "<script>" not in email.html and "<i>" not in email.html
    assert 'href="https://lab.example.org/?a=1&amp;b=&lt;2&gt;/jobs/7"' in email.html
    # The plain-text part is not HTML: values appear as they are.
    assert "<b>x</b>" in email.text and "<script>alert(1)</script>" in email.text


def test_no_link_without_a_frontend() -> None:
    email = render_completion_email(_job(), frontend_url=None)
    assert "/jobs/7" not in email.text and "href" not in email.html


def test_only_errors_quote_the_log() -> None:
    details = "starting\nboom"
    failed = render_completion_email(
        _job(status=JobStatus.ERROR, runtime_details=details), frontend_url=None
    )
    assert "boom" in failed.text and "boom" in failed.html
    canceled = render_completion_email(
        _job(status=JobStatus.CANCELED, runtime_details=details), frontend_url=None
    )
    assert "boom" not in canceled.text


def test_log_tail_is_bounded() -> None:
    lines = [f"line {i}" for i in range(500)]
    tail = log_tail("\n".join(lines))
    assert tail is not None
    assert tail.splitlines() == lines[-LOG_TAIL_LINES:]
    long = log_tail("x" * (LOG_TAIL_CHARS * 3))
    assert long is not None and len(long) == LOG_TAIL_CHARS + 1 and long.startswith("…")
    assert log_tail(None) is None and log_tail(" \n ") is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.2, "less than a second"),
        (7, "7 s"),
        (60, "1 min"),
        (252, "4 min 12 s"),
        (3600, "1 h"),
        (3725, "1 h 2 min"),
        (2 * 86400 + 3 * 3600 + 59, "2 d 3 h"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(T0, T0 + timedelta(seconds=seconds)) == text


def test_duration_without_an_end_is_unknown() -> None:
    assert format_duration(T0, None) == "unknown"
