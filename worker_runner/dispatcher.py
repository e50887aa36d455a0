"""The dispatcher: pull jobs while the backend has room, run each in a thread.

``Runner.run(stop)`` runs a dispatcher thread that long-polls the worker API,
offering what the execution backend says it can take now (``capacity()``: memory,
cores, GPUs of one kind, how many jobs). Each leased job reserves what it needs
on the backend (``reserve``) and is handled in a thread of its own
(``worker_runner.job``), which gives the placement back when the job ends. A job
that could never run here is refused with the reason; one that does not fit now
is handed back.

Starting, the runner holds a lock on its identity (its account and the backend's
job root) and removes what an earlier run of it left behind: runs carrying its
labels and job folders carrying its marker.

Shutdown: setting the stop event stops pulling; running jobs get
``SHUTDOWN_GRACE`` seconds to finish, then their runs are stopped and the jobs
handed back (status ``queued``). ``Runner.hurry()`` ends the grace at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
import time
from typing import Any

from labcloud.contract import FailureKind, HardwareSpec, JobStatus, Outcome
from worker_runner import RunnerError
from worker_runner.backends.base import BackendError, ExecutionBackend, Placement
from worker_runner.client import WorkerApiClient, WorkerApiError
from worker_runner.job import Job, RunnerContext
from worker_runner.settings import WorkerSettings
from worker_runner.staging import remove_stale_folders

logger = logging.getLogger(__name__)

# Long-poll wait while jobs run: a job that ends frees resources that a pull already
# waiting on the server does not offer, so such pulls are kept short.
BUSY_WAIT_S = 2.0
# How long shutdown waits for jobs to be handed back after the grace ended.
HAND_BACK_JOIN_S = 30.0
# The most jobs the worker API leases in one pull (its ``limit`` bound).
MAX_PULL_LIMIT = 100


class RunnerAlreadyRunning(RunnerError):
    """Another runner with this account and job folder is running on this host."""


def runner_identity(worker_name: str, backend: ExecutionBackend) -> str:
    """This runner's identity: a short hash of its account and of where its job
    folders are (the backend's ``identity``).

    Its runs and job folders are marked with it, and a starting runner removes
    only what carries its own: every stack on a host, and every runner of one
    stack, has a folder or an account of its own, while the account name alone is
    the same in every stack (``labcloud up``)."""
    key = "\0".join((worker_name, backend.identity))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def needs_of(raw: dict[str, Any]) -> HardwareSpec:
    """The hardware a raw job spec asks for; nothing when it is malformed (the job
    then fails on its spec, with the reason)."""
    try:
        return HardwareSpec.model_validate(raw.get("hardware") or {})
    except ValueError:
        return HardwareSpec()


class Runner:
    """Pulls and runs jobs on one execution backend until stopped.

    In-process use (tests, embedding)::

        stop = threading.Event()
        runner = Runner(settings, client, backend)
        thread = threading.Thread(target=runner.run, args=(stop,))
        thread.start()
        ...
        stop.set()      # stop pulling; running jobs get SHUTDOWN_GRACE seconds
        runner.hurry()  # optional: end the grace now
        thread.join()
    """

    def __init__(
        self, settings: WorkerSettings, client: WorkerApiClient, backend: ExecutionBackend
    ) -> None:
        self._settings = settings
        self._client = client
        self._backend = backend
        self.runner_id = runner_identity(settings.worker_name, backend)
        self._context = RunnerContext(
            settings=settings,
            client=client,
            backend=backend,
            runner_id=self.runner_id,
            hand_back=threading.Event(),
            hurry=threading.Event(),
        )
        self._state_lock = threading.Lock()
        self._jobs: dict[str, tuple[threading.Thread, Job]] = {}
        # Set whenever a job ends (room came free) and on shutdown.
        self._released = threading.Event()

    @property
    def worker_labels(self) -> dict[str, str]:
        """Labels that mark every run of this runner."""
        return self._context.worker_labels

    def hurry(self) -> None:
        """End the shutdown grace now: running jobs are stopped and handed back."""
        self._context.hurry.set()

    # -- life cycle ------------------------------------------------------------

    def clean_leftovers(self) -> None:
        """Remove the runs and job folders an earlier run of this runner left
        behind. A runner that starts holds no job, so all of them are stale."""
        try:
            removed = self._backend.remove_leftovers(self.worker_labels)
        except BackendError as exc:
            logger.warning("could not remove leftover runs: %s", exc.message)
        else:
            if removed:
                logger.info("removed %d leftover run(s)", removed)
        if not self._settings.keep_job_folders:
            folders = remove_stale_folders(self._backend.job_root, self.runner_id)
            if folders:
                logger.info("removed %d leftover job folder(s)", len(folders))

    def _lock_identity(self) -> int:
        """Hold this runner's identity for the life of the process: a second runner
        with the same account and job folder would remove this one's runs and
        folders as its leftovers. The lock goes with the process, even after
        ``kill -9``. Returns the open lock file; raises ``RunnerAlreadyRunning``."""
        base = self._backend.job_root
        base.mkdir(parents=True, exist_ok=True)
        path = base / f".runner-{self.runner_id}.lock"
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
        self._context.hand_back.clear()
        self.clean_leftovers()
        dispatcher = threading.Thread(
            target=self._dispatch, args=(stop,), name="dispatcher", daemon=True
        )
        room = self._backend.capacity()  # before the first pull takes any of it
        dispatcher.start()
        logger.info(
            "worker %s (runner %s) started: up to %d job(s) at once on %s "
            "(largest job: %d core(s), %d MiB, %d GPU(s)), job folders in %s",
            self._settings.worker_name,
            self.runner_id,
            room.limit if room is not None else 0,
            type(self._backend).__name__,
            room.cpu_cores if room is not None else 0,
            room.memory if room is not None else 0,
            room.gpus if room is not None else 0,
            self._backend.job_root,
        )
        while not stop.wait(0.5):
            pass
        self._shut_down(dispatcher)

    def _running_jobs(self) -> list[threading.Thread]:
        with self._state_lock:
            return [thread for thread, _ in self._jobs.values()]

    def _hand_back_all(self) -> None:
        """Jobs not yet uploading go back to the queue; their handlers wake now."""
        self._context.hand_back.set()
        with self._state_lock:
            jobs = [job for _, job in self._jobs.values()]
        for job in jobs:
            job.wake()

    def _shut_down(self, dispatcher: threading.Thread) -> None:
        self._released.set()
        grace = self._settings.shutdown_grace
        deadline = time.monotonic() + grace
        busy = len(self._running_jobs())
        if busy:
            logger.info("stopping: %d job(s) get up to %.0f s to finish", busy, grace)
        hurry = self._context.hurry
        while not hurry.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._running_jobs():
                break
            hurry.wait(min(0.1, remaining))
        self._hand_back_all()
        hand_back_deadline = time.monotonic() + HAND_BACK_JOIN_S
        for thread in self._running_jobs():
            thread.join(timeout=max(0.0, hand_back_deadline - time.monotonic()))
        # A pull still waiting on the server gets the rest of the grace to come
        # back, so that a job it leases is handed back rather than left to the reaper.
        poll_deadline = 0.0 if hurry.is_set() else deadline
        dispatcher.join(timeout=max(0.0, poll_deadline - time.monotonic()))
        for thread in self._running_jobs():
            thread.join(timeout=max(0.0, hand_back_deadline - time.monotonic()))
        try:
            self._backend.remove_leftovers(self.worker_labels)
        except BackendError as exc:
            logger.warning("could not remove runs on shutdown: %s", exc.message)
        logger.info("worker %s stopped", self._settings.worker_name)

    # -- pulling -----------------------------------------------------------------

    def _dispatch(self, stop: threading.Event) -> None:
        """Pull while the backend has room, and start what was leased."""
        while not stop.is_set():
            self._released.clear()
            capacity = self._backend.capacity()
            if capacity is None:
                # The backend is full: wait for a job to end.
                self._released.wait(0.5)
                continue
            wait = self._settings.wait
            if self._running_jobs():
                wait = min(wait, BUSY_WAIT_S)
            limit = min(capacity.limit, MAX_PULL_LIMIT)
            polled_at = time.monotonic()
            try:
                jobs = self._client.pull_jobs(capacity.query(), limit=limit, wait=wait)
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
            for queue_id, _ in items[limit:]:
                self._hand_back_unstarted(queue_id, "the pull returned more than asked")
            for queue_id, raw in items[:limit]:
                try:
                    self._start(queue_id, raw)
                except Exception:
                    logger.exception("queue %s: could not start handling it", queue_id)

    def _start(self, queue_id: str, raw: dict[str, Any]) -> None:
        """Reserve what the job needs and handle it in a thread of its own."""
        needs = needs_of(raw)
        placement = self._backend.reserve(needs)
        if placement is None:
            reason = self._backend.unfit_reason(needs)
            if reason is None:
                self._hand_back_unstarted(queue_id, "it does not fit in what is free now")
            else:
                self._refuse(queue_id, reason)
            return
        job = Job(self._context, queue_id, raw, placement)
        thread = threading.Thread(
            target=self._handle_and_release,
            args=(job, placement),
            name=f"job-{queue_id}",
            daemon=True,
        )
        with self._state_lock:
            self._jobs[queue_id] = (thread, job)
        try:
            thread.start()
        except BaseException:
            self._release(queue_id, placement)
            raise

    def _refuse(self, queue_id: str, reason: str) -> None:
        # The worker API leases a job only to a worker that offers enough: a job
        # that can never run here came from a server that ignored the offer.
        logger.warning("queue %s: refused: %s", queue_id, reason)
        try:
            self._client.put_status(
                queue_id,
                JobStatus.ERROR,
                reason,
                outcome=Outcome(failure=FailureKind.SYSTEM_ERROR),
            )
        except WorkerApiError as exc:
            logger.warning("queue %s: reporting the refusal failed: %s", queue_id, exc.message)

    def _handle_and_release(self, job: Job, placement: Placement) -> None:
        try:
            job.process()
        except Exception:
            logger.exception("queue %s: unexpected failure", job.queue_id)
        finally:
            self._release(job.queue_id, placement)

    def _release(self, queue_id: str, placement: Placement) -> None:
        self._backend.release(placement)
        with self._state_lock:
            self._jobs.pop(queue_id, None)
        self._released.set()

    def _hand_back_unstarted(self, queue_id: str, why: str) -> None:
        logger.info("queue %s: handing back unstarted job: %s", queue_id, why)
        try:
            self._client.put_status(queue_id, JobStatus.QUEUED)
        except WorkerApiError as exc:
            logger.warning("queue %s: hand-back failed: %s", queue_id, exc.message)
