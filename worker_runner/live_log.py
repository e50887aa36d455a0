"""Ships a running job's output to the worker API as it comes (its live log), and
the progress its tool reports.

The log pump (``worker_runner.job``) hands every piece of the run's output to
``LiveLogShipper.feed``, whatever the backend (a Docker container's stream, AWS
Batch's CloudWatch events). A thread of the shipper sends what has come in one
request as soon as it has something, then waits ``interval`` seconds before the next
request, so a line reaches the worker API within about ``interval`` seconds while
a flood costs at most one request per interval of at most ``max_chunk`` bytes.

Bounds: at most ``max_pending`` bytes wait in memory; beyond, output is skipped
and a marker line says how much (the final ``log.txt`` keeps everything). Once the
worker API answers that the log reached its bound, output is no longer sent, only
progress. Offsets count the bytes shipped, so a chunk sent again after a lost
answer is stored once; each shipper has its own token, so the worker API tells a
new run of the job (after a hand-back or a lost worker) from a repeat.

Progress: a line ``LABCLOUD_PROGRESS <fraction> <message>`` (docs/tools.md) sets
the job's progress; the latest one goes with the next request.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time

from labcloud.contract import PROGRESS_LINE_BYTES, Progress, parse_progress
from worker_runner.client import JobGone, WorkerApiClient, WorkerApiError

logger = logging.getLogger(__name__)

SHIP_INTERVAL_S = 0.2
MAX_CHUNK_BYTES = 256 * 1024
MAX_PENDING_BYTES = 2 * 1024 * 1024
# Waits after a failed request before the same bytes go again.
RETRY_PAUSE_S = 1.0
SKIPPED_MARKER = b"\n[LabCloud: %d bytes of output were not shipped live; the final log has them]\n"


class ProgressParser:
    """Finds ``LABCLOUD_PROGRESS`` lines in output that arrives in arbitrary pieces;
    a line longer than ``PROGRESS_LINE_BYTES`` is not looked at."""

    def __init__(self) -> None:
        self._partial = bytearray()
        self._overlong = False

    def feed(self, data: bytes) -> Progress | None:
        """The last progress the complete lines in ``data`` report, if any."""
        latest = None
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            piece = data[start:end]
            if not self._overlong and len(self._partial) + len(piece) <= PROGRESS_LINE_BYTES:
                found = parse_progress(bytes(self._partial) + piece)
                latest = found or latest
            self._partial.clear()
            self._overlong = False
            start = end + 1
        rest = data[start:]
        if len(self._partial) + len(rest) > PROGRESS_LINE_BYTES:
            self._partial.clear()
            self._overlong = True
        elif not self._overlong:
            self._partial += rest
        return latest


class LiveLogShipper:
    """Ships one run's output; ``feed`` from the pump, ``close`` when the run ended."""

    def __init__(
        self,
        client: WorkerApiClient,
        queue_id: str,
        *,
        interval: float = SHIP_INTERVAL_S,
        max_chunk: int = MAX_CHUNK_BYTES,
        max_pending: int = MAX_PENDING_BYTES,
    ) -> None:
        self._client = client
        self._queue_id = queue_id
        self._run_token = secrets.token_hex(16)
        self._interval = interval
        self._max_chunk = max_chunk
        self._max_pending = max_pending
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._closing = threading.Event()
        self._pending = bytearray()
        self._skipped = 0
        self._progress: Progress | None = None
        self._progress_sent = True
        self._parser = ProgressParser()
        self._offset = 0
        self._truncated = False
        self._gone = False
        self.latest_progress: Progress | None = None
        self._thread = threading.Thread(target=self._run, name=f"live-log-{queue_id}", daemon=True)
        self._thread.start()

    @property
    def shipped(self) -> int:
        """Bytes the worker API acknowledged."""
        return self._offset

    def feed(self, data: bytes) -> None:
        """Take a piece of the run's output (never blocks on the network)."""
        progress = self._parser.feed(data)
        with self._lock:
            if progress is not None:
                self._progress = self.latest_progress = progress
                self._progress_sent = False
            if not self._truncated and not self._gone:
                room = self._max_pending - len(self._pending)
                if self._skipped or len(data) > room:
                    # Once skipping, the rest waits for the marker: no hole mid-line.
                    taken = 0 if self._skipped else max(room, 0)
                    self._pending += data[:taken]
                    self._skipped += len(data) - taken
                else:
                    self._pending += data
        self._ready.set()

    def close(self, timeout: float) -> None:
        """Ship what is left, for at most ``timeout`` seconds, and stop."""
        self._closing.set()
        self._ready.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("queue %s: live log not fully shipped", self._queue_id)

    def _next(self) -> tuple[bytes, Progress | None] | None:
        with self._lock:
            if self._skipped and len(self._pending) < self._max_pending // 2:
                self._pending += SKIPPED_MARKER % self._skipped
                self._skipped = 0
            data = b"" if self._truncated else bytes(self._pending[: self._max_chunk])
            progress = None if self._progress_sent else self._progress
            if not data and progress is None:
                return None
            return data, progress

    def _run(self) -> None:
        while not self._gone:
            self._ready.wait()
            self._ready.clear()
            while True:
                batch = self._next()
                if batch is None:
                    break
                sent = time.monotonic()
                shipped = self._ship(*batch)
                if self._gone or (not shipped and self._closing.is_set()):
                    return
                pause = self._interval - (time.monotonic() - sent)
                if pause > 0 and not self._closing.is_set():
                    time.sleep(pause)
            if self._closing.is_set():
                return

    def _ship(self, data: bytes, progress: Progress | None) -> bool:
        """Send one batch; whether it was acknowledged."""
        try:
            answer = self._client.ship_log(
                self._queue_id, self._run_token, self._offset, data, progress
            )
        except JobGone:
            with self._lock:
                self._gone = True
                self._pending.clear()
            return False
        except WorkerApiError as exc:
            logger.warning("queue %s: live log not shipped: %s", self._queue_id, exc.message)
            if not self._closing.is_set():
                time.sleep(RETRY_PAUSE_S)
            return False
        with self._lock:
            del self._pending[: len(data)]
            self._offset += len(data)
            if progress is self._progress:
                self._progress_sent = True
            if answer.truncated and not self._truncated:
                self._truncated = True
                self._pending.clear()
                self._skipped = 0
        return True
