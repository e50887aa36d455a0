"""The completion email: subject, plain-text and HTML bodies.

Every value that comes from a user, a catalog or a job's log goes through
``html.escape`` in the HTML part, so a log line like ``<script>`` is shown, never run."""

from __future__ import annotations

import html
from dataclasses import dataclass
from datetime import datetime

from labcloud.contract import FailureKind, JobStatus

# How much of a failed job's log the email quotes: enough to see the error, small
# enough for any mail client.
LOG_TAIL_LINES = 40
LOG_TAIL_CHARS = 4000

_OUTCOME: dict[JobStatus, str] = {
    JobStatus.FINISHED: "finished",
    JobStatus.ERROR: "failed",
    JobStatus.CANCELED: "was canceled",
}

# A failed job's ``Outcome.failure`` in the owner's words.
_FAILURE: dict[FailureKind, str] = {
    FailureKind.USER_ERROR: "the job's program failed",
    FailureKind.SYSTEM_ERROR: "LabCloud or its host failed",
    FailureKind.TIMED_OUT: "it ran past its time limit",
    FailureKind.LOST: "its worker stopped answering",
}


@dataclass(frozen=True, slots=True)
class JobFacts:
    """What the email says about a job, read from its row when it ended."""

    id: int
    name: str
    application: str
    version: str
    entrypoint: str
    status: JobStatus
    date_created: datetime
    date_started: datetime | None
    date_finished: datetime | None
    runtime_details: str | None
    # From the job's outcome, when the worker reported one.
    exit_code: int | None = None
    failure: FailureKind | None = None


@dataclass(frozen=True, slots=True)
class RenderedEmail:
    """A ready-to-send email body pair and its subject."""

    subject: str
    html: str
    text: str


def render_completion_email(job: JobFacts, *, frontend_url: str | None) -> RenderedEmail:
    """The email telling a job's owner that it ended. The link to the job is left
    out when no frontend is configured (there would be nothing to open)."""
    outcome = _OUTCOME.get(job.status, job.status.value)
    subject = f"LabCloud: job '{job.name}' {outcome}"[:255]
    link = f"{frontend_url.rstrip('/')}/jobs/{job.id}" if frontend_url else None
    tail = log_tail(job.runtime_details) if job.status is JobStatus.ERROR else None
    facts = [
        ("Job", f"{job.name} (#{job.id})"),
        ("Application", f"{job.application} / {job.version} / {job.entrypoint}"),
        ("Status", job.status.value),
        ("Duration", format_duration(job.date_started or job.date_created, job.date_finished)),
    ]
    if job.failure in _FAILURE:
        facts.append(("Why", _FAILURE[job.failure]))
    if job.exit_code is not None:
        facts.append(("Exit code", str(job.exit_code)))
    return RenderedEmail(
        subject=subject,
        text=_text(job, outcome, facts, link, tail),
        html=_html(job, outcome, facts, link, tail),
    )


def format_duration(start: datetime, end: datetime | None) -> str:
    """``2 d 3 h``, ``1 h 5 min``, ``4 min 12 s``, ``7 s``: the two largest units."""
    if end is None:
        return "unknown"
    seconds = max(0, round((end - start).total_seconds()))
    if seconds < 1:
        return "less than a second"
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        amount, seconds = divmod(seconds, size)
        if amount or parts:
            parts.append(f"{amount} {unit}")
        if len(parts) == 2:
            break
    # "1 h 0 min" reads worse than "1 h".
    return " ".join(part for part in parts if not part.startswith("0 ")) or "0 s"


def log_tail(details: str | None) -> str | None:
    """The last lines of a job's log, bounded in lines and characters."""
    if not details or not details.strip():
        return None
    lines = details.rstrip().splitlines()[-LOG_TAIL_LINES:]
    tail = "\n".join(lines)
    if len(tail) > LOG_TAIL_CHARS:
        tail = "…" + tail[-LOG_TAIL_CHARS:]
    return tail


def _text(
    job: JobFacts,
    outcome: str,
    facts: list[tuple[str, str]],
    link: str | None,
    tail: str | None,
) -> str:
    lines = [f"Your LabCloud job '{job.name}' {outcome}.", ""]
    lines += [f"{label + ':':<13}{value}" for label, value in facts]
    if link:
        lines += ["", f"Details: {link}"]
    if tail:
        lines += ["", "End of the log:", "", tail]
    return "\n".join(lines) + "\n"


def _html(
    job: JobFacts,
    outcome: str,
    facts: list[tuple[str, str]],
    link: str | None,
    tail: str | None,
) -> str:
    e = html.escape
    rows = "\n".join(
        f'<tr><th align="left" style="padding-right:1em">{e(label)}</th><td>{e(value)}</td></tr>'
        for label, value in facts
    )
    parts = [
        "<!DOCTYPE html>",
        '<html><body style="font-family:sans-serif">',
        f"<p>Your LabCloud job <strong>{e(job.name)}</strong> {e(outcome)}.</p>",
        f"<table>\n{rows}\n</table>",
    ]
    if link:
        parts.append(f'<p><a href="{e(link)}">Open the job in LabCloud</a></p>')
    if tail:
        parts.append("<p>End of the log:</p>")
        parts.append(f'<pre style="background:#f4f4f4;padding:0.5em">{e(tail)}</pre>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
