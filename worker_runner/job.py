"""One leased job, from its lease to its final report (contract section 3).

1. ``preprocessing``: create ``{PATH_BASE}/{queue_id}/files``, download every
   ``files_down`` input into it (every destination checked against the folder
   first), create the ``files_up`` folders;
2. ``running``: run ``/bin/sh -c "<cmd>"`` in the job's image on the execution
   backend, in the placement reserved for it, appending its output to
   ``log.txt``; stop it when the job's ``timeout`` passes (on a backend whose
   runs wait in a scheduler's queue, ``running`` is reported and the time counted
   once the run started);
3. ``postprocessing``: upload every file under each ``files_up`` folder, then
   ``log.txt``;
4. ``finished`` on exit code 0, otherwise ``error`` with the reason and the tail of
   the log; both with the ``Outcome`` (exit code, failure kind, times of the run,
   log tail).

The handler sleeps while the run goes on and wakes at once when the run ends (the
backend's future), when the job is no longer ours (a 404 to a status report: the
run is stopped at once, its ``log.txt`` offered to the worker API, which takes it
only from the last worker of a job cancelled with its outputs kept, and nothing
more is reported), when the runner hands jobs back on shutdown, or at the job's
deadline. Runs and job folders are always removed.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from labcloud.contract import (
    OUTCOME_LOG_TAIL_CHARS,
    FailureKind,
    JobSpecs,
    JobStatus,
    Outcome,
)
from worker_runner import RunnerError
from worker_runner.backends.base import (
    BackendError,
    ExecutionBackend,
    Placement,
    RunHandle,
    RunRequest,
    RunResult,
)
from worker_runner.client import JobGone, WorkerApiClient, WorkerApiError
from worker_runner.hardware import gpus_needed
from worker_runner.live_log import LiveLogShipper
from worker_runner.outcomes import JobFailed, failure_of
from worker_runner.ownership import hand_over
from worker_runner.reporting import FinalReport, StatusReporter, runtime_details
from worker_runner.settings import WorkerSettings
from worker_runner.staging import (
    JobFolder,
    ResultsRefused,
    StagingError,
    UnsafePath,
    offer_log,
    read_log_tail,
    stage_inputs,
    upload_results,
)

logger = logging.getLogger(__name__)

LABEL_QUEUE_ID = "labcloud.queue_id"
LABEL_JOB_ID = "labcloud.job_id"
LABEL_WORKER = "labcloud.worker"
# The runner's identity (``worker_runner.dispatcher.runner_identity``): what a
# starting runner cleans up is what carries its own, never what another stack's
# runner of the same account name started on the same engine.
LABEL_RUNNER = "labcloud.runner"

# Time the log follower gets to write the last output after the run ended.
LOG_DRAIN_S = 5.0
# Grace a run gets between SIGTERM and SIGKILL when the runner stops it.
STOP_GRACE_S = 5.0


class _HandBack(RunnerError):
    """The worker is shutting down: the job goes back to the queue."""


@dataclass(frozen=True, slots=True)
class RunnerContext:
    """What every job of one runner shares."""

    settings: WorkerSettings
    client: WorkerApiClient
    backend: ExecutionBackend
    # ``worker_runner.dispatcher.runner_identity``
    runner_id: str
    # Set on shutdown once the grace ended: jobs not yet uploading go back.
    hand_back: threading.Event
    # Set by a second signal: even uploads are cut short.
    hurry: threading.Event

    @property
    def worker_labels(self) -> dict[str, str]:
        """Labels that mark every run of this runner."""
        return {LABEL_WORKER: self.settings.worker_name, LABEL_RUNNER: self.runner_id}


def _now() -> datetime:
    return datetime.now(UTC)


class Job:
    """Handles one leased job in the placement reserved for it (``process``)."""

    def __init__(
        self, context: RunnerContext, queue_id: str, raw: dict[str, object], placement: Placement
    ) -> None:
        self.queue_id = queue_id
        self.placement = placement
        self._context = context
        self._raw = raw
        self._wake = threading.Event()
        self.reporter = StatusReporter(
            context.client, queue_id, context.settings.timeout_status, on_gone=self._wake.set
        )
        self.specs: JobSpecs | None = None
        self.run: RunHandle | None = None
        self._folder: JobFolder | None = None
        self._started = time.monotonic()
        self._committed = False
        self._exit_code: int | None = None
        self._run_started_at: datetime | None = None
        self._run_ended_at: datetime | None = None
        # The backend's id of the run, kept for the outcome after the run is removed.
        self._run_id: str | None = None
        self._running_reported = False

    @property
    def label(self) -> str:
        if self.specs is None:
            return f"queue {self.queue_id}"
        return f"job {self.specs.meta.job_id} (queue {self.queue_id})"

    def wake(self) -> None:
        """Make a waiting handler look at its job now (the runner is handing jobs
        back)."""
        self._wake.set()

    def _elapsed(self) -> float:
        return time.monotonic() - self._started

    @property
    def folder(self) -> JobFolder:
        assert self._folder is not None, "the job folder is named first"
        return self._folder

    # -- from lease to final report ---------------------------------------------

    def process(self) -> FinalReport | None:
        """Handle the job from start to final report; never raises. Returns what
        was reported, or ``None`` when the job was abandoned."""
        backend = self._context.backend
        try:
            self._folder = JobFolder.for_job(backend.job_root, self.queue_id)
        except StagingError as exc:
            refusal = FinalReport(
                JobStatus.ERROR, exc.message, Outcome(failure=FailureKind.SYSTEM_ERROR)
            )
            self._report(refusal)
            return refusal
        try:
            report = self._handle()
            self._remove_run()
            if report is not None:
                self._report(report)
                logger.info("%s: %s after %.1f s", self.label, report.status, self._elapsed())
            return report
        finally:
            self._remove_run()
            if not self._context.settings.keep_job_folders:
                self.folder.remove()

    def _report(self, report: FinalReport) -> None:
        try:
            self.reporter.finish(report)
        except JobGone:
            logger.warning("%s: final status %s answered 404", self.label, report.status)
        except WorkerApiError as exc:
            logger.error("%s: final status %s failed: %s", self.label, report.status, exc.message)

    def _handle(self) -> FinalReport | None:
        try:
            with self.reporter:
                self._phases()
            return FinalReport(JobStatus.FINISHED, outcome=self._outcome(None))
        except JobGone:
            logger.warning("%s: abandoned, the worker API no longer leases it to us", self.label)
            offer_log(self._context.client, self.queue_id, self.folder, self.label)
            return None
        except _HandBack:
            logger.info("%s: handed back (shutdown)", self.label)
            return FinalReport(JobStatus.QUEUED)
        except JobFailed as exc:
            return self._failed(exc.message, exc.kind)
        except Exception as exc:
            logger.exception("%s: failed in the worker", self.label)
            return self._failed(
                f"worker error: {type(exc).__name__}: {exc}", FailureKind.SYSTEM_ERROR
            )

    def _failed(self, reason: str, kind: FailureKind) -> FinalReport:
        details = runtime_details(reason, read_log_tail(self.folder.log))
        return FinalReport(JobStatus.ERROR, details, self._outcome(kind))

    def _outcome(self, failure: FailureKind | None) -> Outcome:
        tail = read_log_tail(self.folder.log, chars=OUTCOME_LOG_TAIL_CHARS)
        return Outcome(
            exit_code=self._exit_code,
            failure=failure,
            started_at=self._run_started_at,
            ended_at=self._run_ended_at,
            log_tail=tail or None,
            runner=self._context.settings.worker_name,
            backend=self._context.settings.backend.value,
            run_id=self._run_id,
        )

    def _check(self) -> None:
        """Raise when the job must not go on: abandoned, or handed back on shutdown."""
        if self.reporter.gone.is_set():
            raise JobGone(f"{self.label} is no longer ours")
        if self._committed:
            # The run is over and its results are being uploaded: the contract does
            # not let such a job go back to the queue, and its results are worth the
            # wait, so only a second signal cuts the upload short.
            if self._context.hurry.is_set():
                raise JobFailed("the worker shut down while uploading the results")
        elif self._context.hand_back.is_set():
            raise _HandBack()

    def _enter(self, status: JobStatus) -> None:
        self._check()
        self.reporter.set(status)
        logger.info("%s: %s (%.1f s)", self.label, status, self._elapsed())

    # -- the phases ----------------------------------------------------------------

    def _phases(self) -> None:
        """Stage, run, upload; raises ``JobFailed`` with the reason of a failure."""
        try:
            self.specs = specs = JobSpecs.model_validate(self._raw)
        except ValidationError as exc:
            raise JobFailed(f"invalid job spec: {exc.errors()[0]['msg']}") from exc
        logger.info("%s: pulled", self.label)
        if self.placement.gpus < gpus_needed(specs.hardware):
            raise JobFailed("the job needs more GPUs than were reserved for it")
        self.folder.create(self._context.runner_id)

        self._enter(JobStatus.PREPROCESSING)
        try:
            size = stage_inputs(self._context.client, specs, self.folder, check=self._check)
        except UnsafePath as exc:
            raise JobFailed(exc.message, FailureKind.USER_ERROR) from exc
        except StagingError as exc:
            raise JobFailed(exc.message) from exc
        logger.info(
            "%s: staged %d input(s), %d bytes (%.1f s)",
            self.label,
            len(specs.handler.files_down),
            size,
            self._elapsed(),
        )

        if not self._context.backend.queues_runs:
            self._enter(JobStatus.RUNNING)
            self._running_reported = True
        failure = self._run(specs)
        self._committed = True
        if not self._running_reported:
            # A queued run that ended before it was seen running.
            self._enter(JobStatus.RUNNING)

        self._enter(JobStatus.POSTPROCESSING)
        try:
            uploaded = upload_results(
                self._context.client, self.queue_id, specs, self.folder, check=self._check
            )
        except ResultsRefused as exc:
            raise JobFailed(exc.message, FailureKind.USER_ERROR) from exc
        except StagingError as exc:
            raise JobFailed(exc.message) from exc
        logger.info("%s: uploaded %d file(s) (%.1f s)", self.label, uploaded, self._elapsed())
        if failure is not None:
            raise failure

    def _run(self, specs: JobSpecs) -> JobFailed | None:
        """Run the job's command; returns why it failed, or ``None``."""
        backend = self._context.backend
        request = RunRequest(
            image=specs.handler.image_url,
            command=("/bin/sh", "-c", " ".join(specs.app.cmd)),
            folder=self.folder.files,
            env=dict(specs.app.env),
            labels={
                **self._context.worker_labels,
                LABEL_QUEUE_ID: self.queue_id,
                LABEL_JOB_ID: str(specs.meta.job_id),
            },
            placement=self.placement,
            container=specs.container,
            timeout=specs.timeout,
        )
        if specs.container.user is not None:
            try:
                hand_over(self.folder.files, specs.container.user)
            except StagingError as exc:
                raise JobFailed(exc.message) from exc
        self._run_started_at = _now()
        try:
            self.run = backend.start(request)
        except BackendError as exc:
            self._run_started_at = None
            raise JobFailed(exc.message) from exc
        self._run_id = self.run.id
        shipper = LiveLogShipper(self._context.client, self.queue_id)
        pump = threading.Thread(
            target=_pump_logs,
            args=(backend, self.run, self.folder.log, shipper),
            name=f"logs-{self.queue_id}",
            daemon=True,
        )
        pump.start()
        try:
            result = self._wait_for_exit(self.run, specs.timeout)
        except BaseException:
            # Whatever went wrong, the run is over for this job: make sure it ended,
            # so that its log ends too and is complete up to the stop (an abandoned
            # job's log may still be uploaded).
            self._kill()
            pump.join(timeout=LOG_DRAIN_S)
            shipper.close(timeout=LOG_DRAIN_S)
            raise
        pump.join(timeout=LOG_DRAIN_S)
        # Before the job's next status: a reader told the job ended finds every
        # shipped chunk in.
        shipper.close(timeout=LOG_DRAIN_S)
        if result is None:
            return JobFailed(f"timed out after {specs.timeout} s", FailureKind.TIMED_OUT)
        self._exit_code = result.exit_code
        return failure_of(result, self.placement.memory)

    def _run_ended(self, _future: Future[RunResult]) -> None:
        self._run_ended_at = _now()
        self._wake.set()

    def _wait_for_exit(self, run: RunHandle, timeout: int | None) -> RunResult | None:
        """Sleep until the run ends and return how; stop it and raise when the job
        is abandoned or handed back; stop it at the deadline and return ``None``."""
        backend = self._context.backend
        ended = backend.follow(run)
        ended.add_done_callback(self._run_ended)
        # A run waiting in a scheduler's queue has its time counted once it started.
        deadline = None
        if timeout and self._running_reported:
            deadline = time.monotonic() + timeout
        while True:
            if not self._running_reported and backend.started(run):
                self._report_running()
                deadline = time.monotonic() + timeout if timeout else None
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._running_reported:
                # Asks the backend again as often as it learns about its runs.
                poll = backend.poll_interval
                remaining = poll if remaining is None else min(remaining, poll)
            self._wake.wait(remaining)
            # Every waker sets its condition first: a wake-up is never lost, and a
            # stale one cannot make this loop spin.
            self._wake.clear()
            if ended.done():
                return ended.result()
            if self.reporter.gone.is_set():
                backend.stop(run, grace=0)
                raise JobGone(f"{self.label} is no longer ours")
            if self._context.hand_back.is_set():
                backend.stop(run, grace=STOP_GRACE_S)
                raise _HandBack()
            if deadline is not None and time.monotonic() >= deadline:
                logger.info("%s: timed out after %s s, stopping it", self.label, timeout)
                backend.stop(run, grace=STOP_GRACE_S)
                try:
                    self._exit_code = ended.result(STOP_GRACE_S + LOG_DRAIN_S).exit_code
                except FutureTimeout:
                    logger.warning("%s: the stopped run did not end", self.label)
                return None

    def _report_running(self) -> None:
        """The queued run started: its time counts from now."""
        self._run_started_at = _now()
        self._enter(JobStatus.RUNNING)
        self._running_reported = True

    def _kill(self) -> None:
        if self.run is None:
            return
        try:
            self._context.backend.stop(self.run, grace=0)
        except Exception as exc:
            # Removal follows and kills it anyway.
            logger.warning("%s: could not stop its container: %s", self.label, exc)

    def _remove_run(self) -> None:
        if self.run is None:
            return
        try:
            self._context.backend.remove(self.run)
        except BackendError as exc:
            logger.warning("%s: could not remove its container: %s", self.label, exc.message)
        else:
            self.run = None


def _pump_logs(
    backend: ExecutionBackend, handle: RunHandle, path: Path, shipper: LiveLogShipper
) -> None:
    """Append the run's output to its log file as it arrives, and hand it to the
    live log's shipper (any backend's ``stream_logs``)."""
    try:
        with path.open("ab") as sink:
            for chunk in backend.stream_logs(handle):
                sink.write(chunk)
                sink.flush()
                shipper.feed(chunk)
    except (BackendError, OSError) as exc:
        logger.warning("log of %s incomplete: %s", handle.id[:12], exc)
