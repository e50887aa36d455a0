"""Status reporting of one job: its phases, its keep-alives and its final report.

While a job is handled, its current status is re-sent every ``TIMEOUT_STATUS``
seconds by a keep-alive thread that lives exactly as long as the handling (a
context manager), so a handler that died never keeps its job alive. A 404 on any
status update means the job is no longer ours (cancelled, deleted, or
re-assigned). The final status carries the job's ``Outcome`` as the JSON body of
``PUT /jobs/{id}/status`` (an extension: DECODE's contract is the query
parameters, which stay as they were; an older worker API ignores the body).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import quote

from labcloud.contract import JobStatus, Outcome
from worker_runner.client import JobGone, WorkerApiClient, WorkerApiError

logger = logging.getLogger(__name__)

# runtime_details travels as a query parameter: keep the encoded URL well below the
# request-line limits of common servers (h11: 16 KiB).
MAX_DETAILS_ENCODED = 8000
# How long a final status is retried while the worker API is unreachable.
FINAL_REPORT_PATIENCE_S = 60.0
FINAL_REPORT_PAUSE_S = 3.0


@dataclass(frozen=True, slots=True)
class FinalReport:
    """What ends a job's handling: its status (``finished``, ``error``, or
    ``queued`` when handed back), the free-text details of a failure and, with a
    terminal status, the structured outcome."""

    status: JobStatus
    runtime_details: str | None = None
    outcome: Outcome | None = None


def runtime_details(reason: str, log_tail: str, *, max_encoded: int = MAX_DETAILS_ENCODED) -> str:
    """The reason, then the log tail, trimmed from the oldest line on until the
    URL-encoded text fits ``max_encoded`` bytes."""
    tail = log_tail
    while True:
        text = f"{reason}\n{tail}" if tail else reason
        if len(quote(text, safe="")) <= max_encoded:
            return text
        if not tail:
            return reason[: max_encoded // 9]
        tail = tail[len(tail) // 4 + 1 :]


def _transient(exc: WorkerApiError) -> bool:
    """Whether the same request may succeed later (no answer, or a 5xx)."""
    return exc.status_code is None or exc.status_code >= 500


class StatusReporter:
    """Reports one job's statuses; as a context manager, also keeps its lease alive.

    ``set`` reports a new phase at once. Inside the ``with`` block a thread re-sends
    the current status every ``interval`` seconds; leaving the block stops it before
    anything else happens, and ``finish`` sends the final status. All sends of one
    job are serialised, so a keep-alive never overtakes a newer status. A 404 sets
    ``gone`` and calls ``on_gone`` (which wakes the job's handler); ``set`` then
    raises ``JobGone``.

    A phase whose report failed because the API could not be reached is sent again,
    before anything newer, by the next keep-alive or report: a phase that ends
    before the API is back (a short upload) still reaches it, in order."""

    def __init__(
        self,
        client: WorkerApiClient,
        queue_id: str,
        interval: float,
        *,
        on_gone: Callable[[], None] | None = None,
    ) -> None:
        self.status = JobStatus.PULLED
        self.gone = threading.Event()
        self._on_gone = on_gone
        self._client = client
        self._queue_id = queue_id
        self._interval = interval
        self._send_lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        # Phases not yet delivered, oldest first (guarded by ``_send_lock``).
        self._missed: list[JobStatus] = []

    def __enter__(self) -> StatusReporter:
        self._stopped.clear()
        self._thread = threading.Thread(
            target=self._keep_alive, name=f"keep-alive-{self._queue_id}", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stopped.set()
        if self._thread is not None:
            # A keep-alive already on the wire finishes; none starts after this.
            self._thread.join(timeout=self._interval)
            self._thread = None

    def _mark_gone(self) -> None:
        self.gone.set()
        if self._on_gone is not None:
            self._on_gone()

    def _send_missed(self, *, retry: bool = True) -> None:
        """Deliver the phases whose report failed, in order (the caller holds the
        send lock). One the API refuses for good is dropped with a warning; an
        unreachable API raises, and they stay for the next attempt."""
        while self._missed:
            status = self._missed[0]
            try:
                self._client.put_status(self._queue_id, status, retry=retry)
            except JobGone:
                raise
            except WorkerApiError as exc:
                if _transient(exc):
                    raise
                logger.warning(
                    "queue %s: %s refused, not sent again: %s", self._queue_id, status, exc.message
                )
            del self._missed[0]

    def _keep_alive(self) -> None:
        while not self._stopped.wait(self._interval):
            with self._send_lock:
                if self._stopped.is_set():
                    return
                try:
                    if self._missed:  # the current phase is the last of them
                        self._send_missed(retry=False)
                    else:
                        self._client.put_status(self._queue_id, self.status, retry=False)
                except JobGone:
                    logger.warning("queue %s: keep-alive answered 404", self._queue_id)
                    self._mark_gone()
                    return
                except WorkerApiError as exc:
                    logger.warning("queue %s: keep-alive failed: %s", self._queue_id, exc.message)
                except Exception:
                    # The next keep-alive may succeed; the thread must not die.
                    logger.exception("queue %s: keep-alive failed", self._queue_id)

    def set(self, status: JobStatus) -> None:
        """Enter a new phase and report it, after any phase not yet delivered. A
        failed report is logged (the keep-alive repeats it); a 404 raises
        ``JobGone``."""
        with self._send_lock:
            self.status = status
            try:
                self._send_missed()
                self._client.put_status(self._queue_id, status)
            except JobGone:
                self._mark_gone()
                raise
            except WorkerApiError as exc:
                logger.warning(
                    "queue %s: reporting %s failed: %s", self._queue_id, status, exc.message
                )
                if _transient(exc):
                    self._missed.append(status)

    def finish(self, report: FinalReport, *, patience: float = FINAL_REPORT_PATIENCE_S) -> None:
        """Send the final status with its outcome, after any phase not yet
        delivered; stops any keep-alive first. An unreachable API is retried for up
        to ``patience`` seconds, since a lost final status would leave the job to
        the reaper."""
        self._stopped.set()
        deadline = time.monotonic() + patience
        with self._send_lock:
            self.status = report.status
            while True:
                try:
                    self._send_missed()
                    self._client.put_status(
                        self._queue_id,
                        report.status,
                        report.runtime_details,
                        outcome=report.outcome,
                    )
                    return
                except JobGone:
                    raise
                except WorkerApiError as exc:
                    if not _transient(exc) or time.monotonic() + FINAL_REPORT_PAUSE_S > deadline:
                        raise
                    logger.warning(
                        "queue %s: reporting %s failed, retrying: %s",
                        self._queue_id,
                        report.status,
                        exc.message,
                    )
                    time.sleep(FINAL_REPORT_PAUSE_S)
