"""The runner loop: lease -> stage in -> run -> stage out -> report.

``Runner.run(stop)`` runs a dispatcher thread that long-polls the worker API for
one job at a time, offering what is free on the host (``ResourcePool``: cores,
memory, GPUs, and at most ``SLOTS`` jobs at once). Each leased job reserves what it
needs and is handled in a thread of its own (contract section 3), which gives the
reservation back when the job ends:

1. ``preprocessing``: create ``{PATH_BASE}/{queue_id}/files``, download every
   ``files_down`` input into it (every destination checked against the folder
   first), create the ``files_up`` folders;
2. ``running``: run ``/bin/sh -c "<cmd>"`` in the job's image on the execution
   backend, appending its output to ``log.txt``; stop it when the job's ``timeout``
   passes;
3. ``postprocessing``: upload every file under each ``files_up`` folder, then
   ``log.txt``;
4. ``finished`` on exit code 0, otherwise ``error`` with the reason and the tail of
   the log.

While a job is handled, its current status is re-sent every ``TIMEOUT_STATUS``
seconds by a keep-alive thread that lives exactly as long as the handling (a
context manager), so a handler that died never keeps its job alive. A 404 on any
status update means the job is no longer ours (cancelled, deleted, or re-assigned):
its container is stopped at once, its ``log.txt`` is offered to the worker API
(which takes it only from the last worker of a job cancelled with its outputs
kept; any other answer is a quiet 404) and nothing more is reported. Containers and
job folders are always removed.

Shutdown: setting the stop event stops pulling; running jobs get
``SHUTDOWN_GRACE`` seconds to finish, then their containers are stopped and the
jobs handed back (status ``queued``). ``Runner.hurry()`` ends the grace at once.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

from pydantic import ValidationError

from labcloud.contract import HardwareSpec, JobSpecs, JobStatus, OutputKind
from worker_runner import RunnerError
from worker_runner.backends.base import (
    BackendError,
    ExecutionBackend,
    RunHandle,
    RunRequest,
    RunResult,
)
from worker_runner.client import JobGone, WorkerApiClient, WorkerApiError
from worker_runner.hardware import HostHardware, Reservation, ResourcePool, gpus_needed
from worker_runner.ownership import hand_over
from worker_runner.settings import WorkerSettings
from worker_runner.staging import (
    LOG_NAME,
    JobFolder,
    StagingError,
    iter_result_files,
    note_in_log,
    output_folders,
    read_log_tail,
    remove_stale_folders,
    result_name_problem,
    stage_inputs,
)

logger = logging.getLogger(__name__)

LABEL_QUEUE_ID = "labcloud.queue_id"
LABEL_JOB_ID = "labcloud.job_id"
LABEL_WORKER = "labcloud.worker"
# The runner's identity (``WorkerSettings.runner_id``): what a starting runner
# cleans up is what carries its own, never what another stack's runner of the same
# account name started on the same engine.
LABEL_RUNNER = "labcloud.runner"

# How often the wait for a container wakes up to look at time-outs, abandonment and
# shutdown: the delay before a 404'd job's container is stopped.
WAIT_POLL_S = 0.25
# Long-poll wait while jobs run: a job that ends frees resources that a pull already
# waiting on the server does not offer, so such pulls are kept short.
BUSY_WAIT_S = 2.0
# Time the log follower gets to write the last output after the container ended.
LOG_DRAIN_S = 5.0
# 128 + SIGKILL: what a run killed by the kernel (or a stop's deadline) exits with.
SIGKILL_EXIT_CODE = 137
# Grace a container gets between SIGTERM and SIGKILL when the runner stops it.
STOP_GRACE_S = 5.0
# How long shutdown waits for jobs to be handed back after the grace ended.
HAND_BACK_JOIN_S = 30.0
# runtime_details travels as a query parameter: keep the encoded URL well below the
# request-line limits of common servers (h11: 16 KiB).
MAX_DETAILS_ENCODED = 8000
# How long a final status is retried while the worker API is unreachable.
FINAL_REPORT_PATIENCE_S = 60.0
FINAL_REPORT_PAUSE_S = 3.0


class JobFailed(RunnerError):
    """The job failed."""


class RunnerAlreadyRunning(RunnerError):
    """Another runner with this account and job folder is running on this host."""


class _Refused(WorkerApiError):
    """The worker API refused one result for good: its name (400) or the owner's
    storage limit (413)."""


class _HandBack(RunnerError):
    """The worker is shutting down: the job goes back to the queue."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """The final report of a job."""

    status: JobStatus
    runtime_details: str | None = None


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
    ``gone``; ``set`` then raises ``JobGone``.

    A phase whose report failed because the API could not be reached is sent again,
    before anything newer, by the next keep-alive or report: a phase that ends
    before the API is back (a short upload) still reaches it, in order."""

    def __init__(self, client: WorkerApiClient, queue_id: str, interval: float) -> None:
        self.status = JobStatus.PULLED
        self.gone = threading.Event()
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
                    self.gone.set()
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
                self.gone.set()
                raise
            except WorkerApiError as exc:
                logger.warning(
                    "queue %s: reporting %s failed: %s", self._queue_id, status, exc.message
                )
                if _transient(exc):
                    self._missed.append(status)

    def finish(self, outcome: Outcome, *, patience: float = FINAL_REPORT_PATIENCE_S) -> None:
        """Send the final status, after any phase not yet delivered; stops any
        keep-alive first. An unreachable API is retried for up to ``patience``
        seconds, since a lost final status would leave the job to the reaper."""
        self._stopped.set()
        deadline = time.monotonic() + patience
        with self._send_lock:
            self.status = outcome.status
            while True:
                try:
                    self._send_missed()
                    self._client.put_status(self._queue_id, outcome.status, outcome.runtime_details)
                    return
                except JobGone:
                    raise
                except WorkerApiError as exc:
                    if not _transient(exc) or time.monotonic() + FINAL_REPORT_PAUSE_S > deadline:
                        raise
                    logger.warning(
                        "queue %s: reporting %s failed, retrying: %s",
                        self._queue_id,
                        outcome.status,
                        exc.message,
                    )
                    time.sleep(FINAL_REPORT_PAUSE_S)


@dataclass
class _Job:
    queue_id: str
    raw: dict[str, object]
    reservation: Reservation
    reporter: StatusReporter
    folder: JobFolder
    started: float = field(default_factory=time.monotonic)
    specs: JobSpecs | None = None
    handle: RunHandle | None = None
    memory: int | None = None
    gpus: tuple[str, ...] = ()
    committed: bool = False

    @property
    def label(self) -> str:
        if self.specs is None:
            return f"queue {self.queue_id}"
        return f"job {self.specs.meta.job_id} (queue {self.queue_id})"

    def elapsed(self) -> float:
        return time.monotonic() - self.started


class Runner:
    """Pulls and runs jobs on one worker host until stopped.

    In-process use (tests, embedding)::

        stop = threading.Event()
        runner = Runner(settings, client, backend, detect_hardware())
        thread = threading.Thread(target=runner.run, args=(stop,))
        thread.start()
        ...
        stop.set()      # stop pulling; running jobs get SHUTDOWN_GRACE seconds
        runner.hurry()  # optional: end the grace now
        thread.join()
    """

    def __init__(
        self,
        settings: WorkerSettings,
        client: WorkerApiClient,
        backend: ExecutionBackend,
        hardware: HostHardware,
    ) -> None:
        self._settings = settings
        self._client = client
        self._backend = backend
        self._pool = ResourcePool(hardware, settings.slots)
        self._hand_back = threading.Event()
        self._hurry = threading.Event()
        self._state_lock = threading.Lock()
        self._jobs: dict[str, threading.Thread] = {}
        # Set whenever a job ends (resources came free) and on shutdown.
        self._released = threading.Event()

    @property
    def worker_labels(self) -> dict[str, str]:
        """Labels that mark every run of this worker."""
        return {LABEL_WORKER: self._settings.worker_name, LABEL_RUNNER: self._settings.runner_id}

    def hurry(self) -> None:
        """End the shutdown grace now: running jobs are stopped and handed back."""
        self._hurry.set()

    # -- life cycle ------------------------------------------------------------

    def clean_leftovers(self) -> None:
        """Remove the containers and job folders an earlier run of this worker left
        behind. A runner that starts holds no job, so all of them are stale."""
        try:
            removed = self._backend.remove_leftovers(self.worker_labels)
        except BackendError as exc:
            logger.warning("could not remove leftover containers: %s", exc.message)
        else:
            if removed:
                logger.info("removed %d leftover container(s)", removed)
        if not self._settings.keep_job_folders:
            folders = remove_stale_folders(self._settings.path_base, self._settings.runner_id)
            if folders:
                logger.info("removed %d leftover job folder(s)", len(folders))

    def _lock_identity(self) -> int:
        """Hold this runner's identity for the life of the process: a second runner
        with the same account and job folder would remove this one's containers
        and folders as its leftovers. The lock goes with the process, even after
        ``kill -9``. Returns the open lock file; raises ``RunnerAlreadyRunning``."""
        base = self._settings.path_base
        base.mkdir(parents=True, exist_ok=True)
        path = base / f".runner-{self._settings.runner_id}.lock"
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise RunnerAlreadyRunning(
                f"another runner of {self._settings.worker_name} uses {base} on this host "
                f"(lock {path}); give each runner its own account or PATH_BASE"
            ) from None
        return descriptor

    def run(self, stop: threading.Event) -> None:
        """Pull and run jobs until ``stop`` is set, then shut down (see the module
        docstring). Returns when every job is finished or handed back; raises
        ``RunnerAlreadyRunning`` at once when a runner of the same identity runs."""
        lock = self._lock_identity()
        try:
            self._run(stop)
        finally:
            os.close(lock)

    def _run(self, stop: threading.Event) -> None:
        self._hand_back.clear()
        self.clean_leftovers()
        self._settings.path_base.mkdir(parents=True, exist_ok=True)
        dispatcher = threading.Thread(
            target=self._dispatch, args=(stop,), name="dispatcher", daemon=True
        )
        dispatcher.start()
        host = self._pool.hardware
        logger.info(
            "worker %s (runner %s) started: up to %d job(s) at once on %d core(s), %d MiB, "
            "%d GPU(s)",
            self._settings.worker_name,
            self._settings.runner_id,
            self._pool.slots,
            host.cpu_cores,
            host.memory,
            len(host.gpus),
        )
        while not stop.wait(0.5):
            pass
        self._shut_down(dispatcher)

    def _running_jobs(self) -> list[threading.Thread]:
        with self._state_lock:
            return list(self._jobs.values())

    def _shut_down(self, dispatcher: threading.Thread) -> None:
        self._released.set()
        deadline = time.monotonic() + self._settings.shutdown_grace
        busy = len(self._running_jobs())
        if busy:
            logger.info(
                "stopping: %d job(s) get up to %.0f s to finish",
                busy,
                self._settings.shutdown_grace,
            )
        while not self._hurry.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._running_jobs():
                break
            self._hurry.wait(min(0.1, remaining))
        self._hand_back.set()
        hand_back_deadline = time.monotonic() + HAND_BACK_JOIN_S
        for thread in self._running_jobs():
            thread.join(timeout=max(0.0, hand_back_deadline - time.monotonic()))
        # A pull still waiting on the server gets the rest of the grace to come
        # back, so that a job it leases is handed back rather than left to the reaper.
        poll_deadline = 0.0 if self._hurry.is_set() else deadline
        dispatcher.join(timeout=max(0.0, poll_deadline - time.monotonic()))
        for thread in self._running_jobs():
            thread.join(timeout=max(0.0, hand_back_deadline - time.monotonic()))
        try:
            self._backend.remove_leftovers(self.worker_labels)
        except BackendError as exc:
            logger.warning("could not remove containers on shutdown: %s", exc.message)
        logger.info("worker %s stopped", self._settings.worker_name)

    # -- pulling -----------------------------------------------------------------

    def _dispatch(self, stop: threading.Event) -> None:
        """Pull one job at a time while something is free, and start it."""
        while not stop.is_set():
            self._released.clear()
            offer = self._pool.offer()
            if offer is None:
                # Every slot, core or MiB is held: wait for a job to end.
                self._released.wait(0.5)
                continue
            wait = self._settings.wait
            if self._pool.running:
                wait = min(wait, BUSY_WAIT_S)
            polled_at = time.monotonic()
            try:
                jobs = self._client.pull_jobs(offer, limit=1, wait=wait)
            except WorkerApiError as exc:
                logger.warning("pull failed: %s", exc.message)
                stop.wait(self._settings.timeout_job)
                continue
            except Exception:
                logger.exception("pull failed")
                stop.wait(self._settings.timeout_job)
                continue
            if not jobs:
                # A server that honours ``wait`` held the request; one that ignored
                # it answered at once and must not be hammered.
                if time.monotonic() - polled_at < wait * 0.8 or wait <= 0:
                    stop.wait(self._settings.timeout_job)
                continue
            items = list(jobs.items())
            if stop.is_set():
                for queue_id, _ in items:
                    self._hand_back_unstarted(queue_id, "the worker is shutting down")
                break
            for queue_id, _ in items[1:]:
                self._hand_back_unstarted(queue_id, "the pull returned more than asked")
            try:
                self._start(*items[0])
            except Exception:
                logger.exception("queue %s: could not start handling it", items[0][0])

    def _start(self, queue_id: str, raw: dict[str, object]) -> None:
        """Reserve what the job needs and handle it in a thread of its own."""
        needs = _needs(raw)
        reservation = self._pool.reserve(needs)
        if reservation is None:
            reason = self._pool.unfit_reason(needs)
            if reason is None:
                self._hand_back_unstarted(queue_id, "it does not fit in what is free now")
            else:
                # The worker API leases a job only to a worker that offers enough.
                logger.warning("queue %s: refused: %s", queue_id, reason)
                try:
                    self._client.put_status(queue_id, JobStatus.ERROR, reason)
                except WorkerApiError as exc:
                    logger.warning(
                        "queue %s: reporting the refusal failed: %s", queue_id, exc.message
                    )
            return
        thread = threading.Thread(
            target=self._handle_and_release,
            args=(queue_id, raw, reservation),
            name=f"job-{queue_id}",
            daemon=True,
        )
        with self._state_lock:
            self._jobs[queue_id] = thread
        try:
            thread.start()
        except BaseException:
            self._release(queue_id, reservation)
            raise

    def _handle_and_release(
        self, queue_id: str, raw: dict[str, object], reservation: Reservation
    ) -> None:
        try:
            self.handle_job(queue_id, raw, reservation)
        except Exception:
            logger.exception("queue %s: unexpected failure", queue_id)
        finally:
            self._release(queue_id, reservation)

    def _release(self, queue_id: str, reservation: Reservation) -> None:
        self._pool.release(reservation)
        with self._state_lock:
            self._jobs.pop(queue_id, None)
        self._released.set()

    def _hand_back_unstarted(self, queue_id: str, why: str) -> None:
        logger.info("queue %s: handing back unstarted job: %s", queue_id, why)
        try:
            self._client.put_status(queue_id, JobStatus.QUEUED)
        except WorkerApiError as exc:
            logger.warning("queue %s: hand-back failed: %s", queue_id, exc.message)

    # -- one job ---------------------------------------------------------------

    def handle_job(
        self, queue_id: str, raw: dict[str, object], reservation: Reservation
    ) -> Outcome | None:
        """Handle one leased job from start to final report; never raises. Returns
        what was reported, or ``None`` when the job was abandoned."""
        reporter = StatusReporter(self._client, queue_id, self._settings.timeout_status)
        try:
            folder = JobFolder.for_job(self._settings.path_base, self._settings.host_base, queue_id)
        except StagingError as exc:
            self._report(queue_id, reporter, Outcome(JobStatus.ERROR, exc.message))
            return Outcome(JobStatus.ERROR, exc.message)
        job = _Job(
            queue_id=queue_id, raw=raw, reservation=reservation, reporter=reporter, folder=folder
        )
        try:
            outcome = self._process(job)
            self._remove_container(job)
            if outcome is not None:
                self._report(job.label, reporter, outcome)
                logger.info("%s: %s after %.1f s", job.label, outcome.status, job.elapsed())
            return outcome
        finally:
            self._remove_container(job)
            if not self._settings.keep_job_folders:
                folder.remove()

    def _report(self, label: str, reporter: StatusReporter, outcome: Outcome) -> None:
        try:
            reporter.finish(outcome)
        except JobGone:
            logger.warning("%s: final status %s answered 404", label, outcome.status)
        except WorkerApiError as exc:
            logger.error("%s: final status %s failed: %s", label, outcome.status, exc.message)

    def _process(self, job: _Job) -> Outcome | None:
        try:
            with job.reporter:
                return self._phases(job)
        except JobGone:
            logger.warning("%s: abandoned, the worker API no longer leases it to us", job.label)
            self._offer_log(job)
            return None
        except _HandBack:
            logger.info("%s: handed back (shutdown)", job.label)
            return Outcome(JobStatus.QUEUED)
        except JobFailed as exc:
            return Outcome(JobStatus.ERROR, self._details(job, exc.message))
        except Exception as exc:
            logger.exception("%s: failed in the worker", job.label)
            return Outcome(
                JobStatus.ERROR, self._details(job, f"worker error: {type(exc).__name__}: {exc}")
            )

    def _offer_log(self, job: _Job) -> None:
        """Upload what the stopped run wrote: the worker API keeps it when the job
        was cancelled with its outputs kept, and answers 404 when they are being
        discarded or the job went to another worker."""
        if not job.folder.log.is_file():
            return
        try:
            self._client.upload(job.queue_id, OutputKind.LOG, LOG_NAME, job.folder.log)
        except JobGone:
            logger.info("%s: its log is not wanted (discarded or re-assigned)", job.label)
        except WorkerApiError as exc:
            logger.warning("%s: could not upload the partial log: %s", job.label, exc.message)
        except OSError as exc:
            logger.warning("%s: could not read the partial log: %s", job.label, exc)
        else:
            logger.info("%s: partial log uploaded", job.label)

    def _details(self, job: _Job, reason: str) -> str:
        return runtime_details(reason, read_log_tail(job.folder.log))

    def _check(self, job: _Job) -> None:
        """Raise when the job must not go on: abandoned, or handed back on shutdown."""
        if job.reporter.gone.is_set():
            raise JobGone(f"{job.label} is no longer ours")
        if job.committed:
            # The run is over and its results are being uploaded: the contract does
            # not let such a job go back to the queue, and its results are worth the
            # wait, so only a second signal cuts the upload short.
            if self._hurry.is_set():
                raise JobFailed("the worker shut down while uploading the results")
        elif self._hand_back.is_set():
            raise _HandBack()

    def _enter(self, job: _Job, status: JobStatus) -> None:
        self._check(job)
        job.reporter.set(status)
        logger.info("%s: %s (%.1f s)", job.label, status, job.elapsed())

    def _phases(self, job: _Job) -> Outcome:
        try:
            job.specs = JobSpecs.model_validate(job.raw)
        except ValidationError as exc:
            raise JobFailed(f"invalid job spec: {exc.errors()[0]['msg']}") from exc
        logger.info("%s: pulled", job.label)
        job.gpus = self._gpus_for(job.specs, job.reservation)
        job.folder.create(self._settings.runner_id)

        self._enter(job, JobStatus.PREPROCESSING)
        try:
            size = stage_inputs(self._client, job.specs, job.folder, check=lambda: self._check(job))
        except StagingError as exc:
            raise JobFailed(exc.message) from exc
        logger.info(
            "%s: staged %d input(s), %d bytes (%.1f s)",
            job.label,
            len(job.specs.handler.files_down),
            size,
            job.elapsed(),
        )

        self._enter(job, JobStatus.RUNNING)
        failure = self._run_container(job)
        job.committed = True

        self._enter(job, JobStatus.POSTPROCESSING)
        uploaded = self._upload_results(job)
        logger.info("%s: uploaded %d file(s) (%.1f s)", job.label, uploaded, job.elapsed())
        if failure is not None:
            raise JobFailed(failure)
        return Outcome(JobStatus.FINISHED)

    def _gpus_for(self, specs: JobSpecs, reservation: Reservation) -> tuple[str, ...]:
        """The device ids of the GPUs reserved for the job (only those are exposed
        to its container)."""
        if len(reservation.gpus) < gpus_needed(specs.hardware):
            raise JobFailed("the job needs more GPUs than were reserved for it")
        return tuple(gpu.index for gpu in reservation.gpus)

    def _run_container(self, job: _Job) -> str | None:
        """Run the job's command; returns why it failed, or ``None``."""
        assert job.specs is not None
        specs = job.specs
        job.memory = job.reservation.memory
        request = RunRequest(
            image=specs.handler.image_url,
            command=("/bin/sh", "-c", " ".join(specs.app.cmd)),
            host_folder=job.folder.host_files,
            env=dict(specs.app.env),
            labels={
                **self.worker_labels,
                LABEL_QUEUE_ID: job.queue_id,
                LABEL_JOB_ID: str(specs.meta.job_id),
            },
            memory=job.memory,
            cpus=job.reservation.cpus,
            gpus=job.gpus,
            network=self._settings.container_network,
            pids_limit=specs.container.pids_limit or self._settings.container_pids_limit,
            user=specs.container.user,
            read_only_root=specs.container.read_only_root,
        )
        if specs.container.user is not None:
            try:
                hand_over(job.folder.files, specs.container.user)
            except StagingError as exc:
                raise JobFailed(exc.message) from exc
        try:
            job.handle = self._backend.start(request)
        except BackendError as exc:
            raise JobFailed(exc.message) from exc
        pump = threading.Thread(
            target=_pump_logs,
            args=(self._backend, job.handle, job.folder.log),
            name=f"logs-{job.queue_id}",
            daemon=True,
        )
        pump.start()
        try:
            result, timed_out = self._wait_for_exit(job, job.handle, specs.timeout)
        except BaseException:
            # Whatever went wrong, the run is over for this job: make sure it ended,
            # so that its log ends too and is complete up to the stop (an abandoned
            # job's log may still be uploaded).
            self._kill(job)
            pump.join(timeout=LOG_DRAIN_S)
            raise
        pump.join(timeout=LOG_DRAIN_S)
        if timed_out:
            return f"timed out after {specs.timeout} s"
        return _failure(result, job.memory)

    def _wait_for_exit(
        self, job: _Job, handle: RunHandle, timeout: int | None
    ) -> tuple[RunResult | None, bool]:
        run_started = time.monotonic()
        deadline = run_started + timeout if timeout else None
        while True:
            poll = WAIT_POLL_S
            if deadline is not None:
                poll = max(0.0, min(poll, deadline - time.monotonic()))
            result = self._backend.wait(handle, poll)
            if result is not None:
                return result, False
            if job.reporter.gone.is_set():
                self._backend.stop(handle, grace=0)
                raise JobGone(f"{job.label} is no longer ours")
            if self._hand_back.is_set():
                self._backend.stop(handle, grace=STOP_GRACE_S)
                raise _HandBack()
            if deadline is not None and time.monotonic() >= deadline:
                logger.info("%s: timed out after %s s, stopping it", job.label, timeout)
                self._backend.stop(handle, grace=STOP_GRACE_S)
                return self._backend.wait(handle, STOP_GRACE_S + LOG_DRAIN_S), True

    def _upload_results(self, job: _Job) -> int:
        """Upload every result, then the log; returns how many files were stored.

        A result whose name storage cannot take (or that the API refuses, 400) is
        skipped with a line in the log saying why: one odd name must not cost the
        others. Once the owner's storage limit refuses a result (413), the rest
        would be refused too: the log (which gets an allowance beyond the limit)
        is still uploaded, with a line saying what was not kept, and the job fails
        saying so."""
        assert job.specs is not None
        count = 0
        over_limit: str | None = None
        for kind, top in output_folders(job.specs, job.folder).items():
            for relative, path in iter_result_files(top):
                self._check(job)
                name = f"{kind.value}/{relative}"
                if over_limit is not None:
                    note_in_log(job.folder.log, f"not uploaded (storage limit): {name!r}")
                    continue
                problem = result_name_problem(relative)
                if problem is not None:
                    note_in_log(job.folder.log, f"skipped result {name!r}: {problem}")
                    continue
                try:
                    self._upload(job, kind, relative, path)
                except _Refused as exc:
                    if exc.status_code == 413:
                        over_limit = exc.message
                        note_in_log(job.folder.log, f"not uploaded: {name!r}: {exc.message}")
                    else:
                        note_in_log(job.folder.log, f"skipped result {name!r}: {exc.message}")
                    continue
                count += 1
        try:
            self._upload(job, OutputKind.LOG, LOG_NAME, job.folder.log)
        except _Refused as exc:
            raise JobFailed(f"the log was not kept: {exc.message}") from exc
        if over_limit is not None:
            raise JobFailed(f"results not all kept: {over_limit}")
        return count + 1

    def _upload(self, job: _Job, kind: OutputKind, relative: str, path: Path) -> None:
        try:
            self._client.upload(job.queue_id, kind, relative, path)
        except JobGone:
            raise
        except WorkerApiError as exc:
            if exc.status_code in (400, 413, 422):
                raise _Refused(exc.message, status_code=exc.status_code) from exc
            raise JobFailed(f"upload failed: {kind.value}/{relative}: {exc.message}") from exc
        except OSError as exc:
            raise JobFailed(f"upload failed: {kind.value}/{relative}: {exc}") from exc

    def _kill(self, job: _Job) -> None:
        if job.handle is None:
            return
        try:
            self._backend.stop(job.handle, grace=0)
        except Exception as exc:
            # Removal follows and kills it anyway.
            logger.warning("%s: could not stop its container: %s", job.label, exc)

    def _remove_container(self, job: _Job) -> None:
        if job.handle is None:
            return
        try:
            self._backend.remove(job.handle)
        except BackendError as exc:
            logger.warning("%s: could not remove its container: %s", job.label, exc.message)
        else:
            job.handle = None


def _needs(raw: dict[str, object]) -> HardwareSpec:
    """The hardware a raw job spec asks for; nothing when it is malformed (the job
    then fails on its spec, with the reason)."""
    try:
        return HardwareSpec.model_validate(raw.get("hardware") or {})
    except ValidationError:
        return HardwareSpec()


def _failure(result: RunResult | None, memory: int | None) -> str | None:
    if result is None:
        return "the container did not end after being stopped"
    if result.oom_killed:
        limit = f" at {memory} MiB" if memory is not None else ""
        return f"memory limit exceeded: killed{limit} (exit code {result.exit_code})"
    if result.outside_signal is not None:
        return (
            f"killed from outside the runner: signal {result.outside_signal} sent through "
            f"the container engine (exit code {result.exit_code})"
        )
    if result.exit_code == SIGKILL_EXIT_CODE:
        # Only the engine's flag says "out of memory": a guess from the exit code
        # blamed the job for kills from outside (another stack's cleanup). The flag
        # is lost now and then when a container dies at once (measured: 5 of 60 OOM
        # kills, 4 at a time), so the text leaves that open without claiming it.
        return (
            f"exit code {SIGKILL_EXIT_CODE}: killed with SIGKILL, not by the runner; the "
            "container engine reported no out-of-memory kill"
        )
    if result.exit_code != 0:
        reason = f"exit code {result.exit_code}"
        return f"{reason}: {result.error}" if result.error else reason
    return None


def _pump_logs(backend: ExecutionBackend, handle: RunHandle, path: Path) -> None:
    """Append the run's output to its log file as it arrives."""
    try:
        with path.open("ab") as sink:
            for chunk in backend.stream_logs(handle):
                sink.write(chunk)
                sink.flush()
    except (BackendError, OSError) as exc:
        logger.warning("log of %s incomplete: %s", handle.id[:12], exc)
