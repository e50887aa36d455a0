"""Following a job: its live log as it is written, and its status line (progress, or
why it waits) as it changes, until it ends.

The status comes from ``GET /jobs/{id}?wait=`` (the server answers when the status
changes), the log from ``GET /jobs/{id}/logs?follow=true`` in a thread of its own;
neither polls in a tight loop. A server without live logs is said so once, and the
job is still followed to its end."""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable

import httpx
from rich.console import Console
from rich.live import Live
from rich.text import Text

from labcloud_cli.errors import Refused
from labcloud_cli.user.client import Json, LogsUnavailable, UserClient, Utf8Writer
from labcloud_cli.user.formatting import ENDED, status_line

# Seconds each status request waits on the server (within its default maximum, 60).
STATUS_WAIT = 30.0
# While the job runs: the server answers a wait on a status change only, so progress
# reports (which change no status) are fetched this often.
PROGRESS_WAIT = 3.0
# After the job ended, how long its last log chunks may take to come in.
LOG_GRACE = 10.0
# A server whose JOB_WAIT_MAX_SECONDS is below STATUS_WAIT says its own limit.
_WAIT_LIMIT = re.compile(r"wait may be at most ([0-9.]+) seconds")


def stream_log(
    client: UserClient,
    job_id: int,
    write: Callable[[bytes], None],
    ended: Callable[[], bool],
    *,
    offset: int = 0,
) -> str | None:
    """Write the job's log from ``offset`` as it comes until it is complete (or the
    job ``ended`` more than ``LOG_GRACE`` seconds ago without it); None, or why
    live logs cannot be followed."""
    ended_at: float | None = None
    while True:
        try:
            received = 0
            with client.log_stream(job_id, offset) as chunks:
                for chunk in chunks:
                    write(chunk)
                    offset += len(chunk)
                    received += len(chunk)
            # The stream ends with the job or after a while: what is left, and
            # whether the log is complete, come from one plain read.
            page = client.log_page(job_id, offset)
            write(page.text)
            offset = page.next_offset
            if page.complete:
                return None
            received += len(page.text)
        except LogsUnavailable as exc:
            return str(exc)
        except (httpx.TransportError, Refused):
            received = 0
        if ended():
            ended_at = ended_at or time.monotonic()
            if time.monotonic() - ended_at > LOG_GRACE:
                return None
        if not received:
            time.sleep(0.5)


def follow_job(
    client: UserClient, job: Json, console: Console, *, log_out: Callable[[str], None]
) -> Json:
    """Show ``job``'s status line and live log until it ends; the ended job."""
    done = threading.Event()
    unavailable: list[str] = []
    if console.is_terminal and sys.stdout.isatty():
        # One terminal for both: whole lines go above the status line, which rich
        # redraws below them.
        log_out = _LinesAbove(console)
    writer = Utf8Writer(log_out)

    def logs() -> None:
        reason = stream_log(client, job["id"], writer, done.is_set)
        writer.flush()
        if reason:
            unavailable.append(reason)
            console.print(
                f"{reason}; the log will be in {job['paths_out']['log']}/ once the job ends",
                markup=False,
                highlight=False,
            )

    thread = threading.Thread(target=logs, name=f"log-{job['id']}", daemon=True)
    thread.start()
    # On a terminal the line is redrawn in place, with the time the job has run;
    # elsewhere (a log file) a line is added only when the status or progress
    # changes.
    elapsed = console.is_terminal
    shown = status_line(job, elapsed=elapsed)
    # stdout is left alone: the log written there may go to a file or a pipe.
    live = Live(
        Text(shown),
        console=console,
        auto_refresh=False,
        transient=True,
        redirect_stdout=False,
        redirect_stderr=False,
    )
    if console.is_terminal:
        live.start()
    else:
        console.print(shown, markup=False, highlight=False)
    longest = STATUS_WAIT
    try:
        while job["status"] not in ENDED:
            wait = min(longest, PROGRESS_WAIT if job["status"] == "running" else STATUS_WAIT)
            try:
                job = client.job(job["id"], wait=wait, known=job["status"])
            except httpx.TransportError:
                time.sleep(1)
                continue
            except Refused as exc:
                limit = _WAIT_LIMIT.search(str(exc))
                if limit is None or float(limit.group(1)) >= wait:
                    raise
                longest = float(limit.group(1))
                continue
            if wait <= 0:  # a server that does not wait: asked now and then
                time.sleep(PROGRESS_WAIT)
            line = status_line(job, elapsed=elapsed)
            if line != shown:
                shown = line
                if console.is_terminal:
                    live.update(Text(line), refresh=True)
                else:
                    console.print(line, markup=False, highlight=False)
        done.set()
        thread.join(LOG_GRACE + STATUS_WAIT)
    finally:
        done.set()
        if console.is_terminal:
            live.stop()
        writer.flush()
        if isinstance(log_out, _LinesAbove):
            log_out.flush()
        sys.stdout.flush()
    return job


class _LinesAbove:
    """Log text printed on the status line's console a whole line at a time."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._pending = ""
        self._lock = threading.Lock()

    def __call__(self, text: str) -> None:
        with self._lock:
            whole, newline, self._pending = (self._pending + text).rpartition("\n")
            if newline:
                self._console.out(whole, highlight=False)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self._console.out(self._pending, highlight=False)
            self._pending = ""
