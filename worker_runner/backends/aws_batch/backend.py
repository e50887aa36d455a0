"""Runs jobs as AWS Batch jobs: a cloud runner's execution backend.

A runner with this backend is a cloud worker (its account is in the ``cloud``
group, so the worker API leases it ``cloud`` jobs, and jobs for any environment
once they are ``BATCH_OLDER_THAN`` seconds old). What it offers comes from its
settings, not from its host: per job, up to the ``BATCH_MAX_*`` ceilings; in all,
up to ``BATCH_MAX_IN_FLIGHT`` jobs at once.

A job's folder lives on the shared file system (``BATCH_SHARED_DIR`` on the
runner's host, EFS in AWS): the runner stages the inputs there and uploads the
results from there, as with Docker. Each run is a ``SubmitJob`` on the CPU or GPU
queue, with a job definition per image and resource shape (``definitions``) and a
command prefix that points ``/files`` at the job's folder; its tags name the
runner and the job, so a restarted runner finds what its previous life left.

Calls to Batch: ``DescribeJobQueues`` (once, at start), ``DescribeJobDefinitions``
and ``RegisterJobDefinition`` (once per shape), ``SubmitJob`` (per run),
``DescribeJobs`` (one call per 100 runs followed, every ``BATCH_POLL_INTERVAL``
seconds; also when finding leftovers), ``ListJobs`` (finding leftovers, and the
exit code of a failed job whose description lacks it), ``TerminateJob`` (stop
and remove). To CloudWatch Logs: ``GetLogEvents`` on the job's stream of group
``/aws/batch/job``.

Throttling: every client retries throttled calls with botocore's adaptive mode
(client-side rate limiting with backoff); ``SubmitJob`` — Batch allows 50 a
second per account — backs off again on its own before giving up, and a run
that still cannot be submitted fails its job's start, which the runner reports
as it reports any start failure. A poll that keeps failing is retried by the
poller for a minute before the runs are given up.

Waiting for a place: a job is reported ``running``, and its time limit counted,
once DescribeJobs says RUNNING; one still waiting (SUBMITTED to STARTING) after
``BATCH_MAX_QUEUE_WAIT`` seconds is terminated and fails (a GPU job on a queue
whose compute environments have no GPU would wait for ever).

Ending a run: ``TerminateJob`` (Batch cancels a job not yet started and stops a
running one: SIGTERM, then SIGKILL after ECS's stop timeout, 30 s unless the
compute environment's agent says otherwise; the ``grace`` of ``stop`` is
therefore Batch's, not ours). Batch keeps ended jobs for days and cannot delete
them: ``remove`` only terminates a run still going.
"""

from __future__ import annotations

import logging
import math
import random
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from labcloud.contract import HardwareSpec
from worker_runner.backends.aws_batch.definitions import (
    SHARED_MOUNT,
    JobDefinitions,
    Shape,
    files_command,
)
from worker_runner.backends.aws_batch.settings import BatchSettings
from worker_runner.backends.aws_batch.states import (
    ACTIVE_STATES,
    ENDED_STATES,
    STARTED_STATES,
    UNKNOWN_EXIT,
    WAITING_STATES,
    result_of,
)
from worker_runner.backends.base import (
    DEFAULT_STOP_GRACE_S,
    BackendError,
    Capacity,
    ExecutionBackend,
    Placement,
    RunHandle,
    RunRequest,
    RunResult,
)
from worker_runner.hardware import gpus_needed

logger = logging.getLogger(__name__)

LOG_GROUP = "/aws/batch/job"
# Batch's limit of job ids per DescribeJobs.
DESCRIBE_CHUNK = 100
THROTTLING_CODES = frozenset(
    {"TooManyRequestsException", "ThrottlingException", "Throttling", "RequestLimitExceeded"}
)
# SubmitJob's own backoff on top of botocore's retries: 0.5, 1, 2, 4, 8 s (with
# jitter), about 15 s in all before a job's start fails.
SUBMIT_RETRIES = 5
SUBMIT_BACKOFF_S = 0.5
SUBMIT_BACKOFF_MAX_S = 8.0
# Batch's least attemptDurationSeconds, and how long after the runner's own
# deadline Batch's comes (the runner's stop takes a few seconds).
MIN_ATTEMPT_DURATION_S = 60
BACKSTOP_MARGIN_S = 30
TERMINATE_REASON = "LabCloud: stopped by its runner (cancelled, timed out or shutting down)"
LEFTOVER_REASON = "LabCloud: left by an earlier run of its runner, which no longer holds the job"
# Batch's limits on tag values and job names.
TAG_VALUE_MAX = 256
JOB_NAME_MAX = 128


def _client_config(in_flight: int) -> Config:
    return Config(
        retries={"mode": "adaptive", "max_attempts": 10},
        connect_timeout=10,
        read_timeout=30,
        # Every job in flight may submit, read its log or be stopped at once.
        max_pool_connections=in_flight + 4,
    )


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


@dataclass(frozen=True, slots=True)
class BatchCapacity(Capacity):
    """A cloud runner's offer: also how old a job for any environment must be
    before this runner takes it (the pull's ``older_than``)."""

    older_than: int = 0

    def query(self) -> dict[str, str | int]:
        params = Capacity.query(self)
        params["older_than"] = self.older_than
        return params


@dataclass(slots=True)
class _Tracked:
    """What the backend knows of one of its runs, from the latest DescribeJobs."""

    status: str = "SUBMITTED"
    log_stream: str | None = None
    stopping: bool = False
    submitted_at: float = field(default_factory=time.monotonic)
    ended: threading.Event = field(default_factory=threading.Event)


def _job_name(folder: Path) -> str:
    """``labcloud-<queue id>``: the job folder's name, in Batch's alphabet."""
    key = re.sub(
        r"[^A-Za-z0-9_-]", "-", folder.parent.name if folder.name == "files" else folder.name
    )
    return f"labcloud-{key}"[:JOB_NAME_MAX]


class BatchBackend(ExecutionBackend):
    """``ExecutionBackend`` on AWS Batch, through boto3 clients of ``batch`` and
    ``logs`` (made from the environment by ``from_settings``)."""

    # A job waits in Batch's queue (RUNNABLE, STARTING) before its container runs:
    # the runner reports it ``running`` once DescribeJobs says RUNNING.
    queues_runs = True

    def __init__(self, settings: BatchSettings, batch: Any, logs: Any) -> None:
        super().__init__(poll_interval=settings.batch_poll_interval)
        self.settings = settings
        self._batch = batch
        self._logs = logs
        self._definitions = JobDefinitions(batch, settings)
        self._lock = threading.Lock()
        self._placements: set[Placement] = set()
        self._runs: dict[str, _Tracked] = {}
        self._closed = threading.Event()

    @classmethod
    def from_settings(cls, settings: BatchSettings) -> Self:
        """Clients from boto3's usual variables (region, endpoint, credentials);
        raises ``BackendError`` when the job queues cannot be found."""
        try:
            config = _client_config(settings.batch_max_in_flight)
            batch = boto3.client("batch", config=config)
            logs = boto3.client("logs", config=config)
        except BotoCoreError as exc:
            raise BackendError(f"cannot make AWS clients (set AWS_DEFAULT_REGION?): {exc}") from exc
        backend = cls(settings, batch, logs)
        backend.check_queues()
        return backend

    def check_queues(self) -> None:
        """Raise ``BackendError`` unless both job queues exist and are enabled."""
        names = sorted({self.settings.batch_job_queue, self.settings.gpu_job_queue})
        try:
            queues = self._batch.describe_job_queues(jobQueues=names).get("jobQueues", [])
        except (ClientError, BotoCoreError) as exc:
            raise BackendError(f"cannot reach AWS Batch: {exc}") from exc
        found = {q["jobQueueName"]: q for q in queues} | {q["jobQueueArn"]: q for q in queues}
        for name in names:
            queue = found.get(name)
            if queue is None:
                raise BackendError(f"AWS Batch has no job queue {name}")
            if queue.get("state") != "ENABLED":
                raise BackendError(f"AWS Batch job queue {name} is {queue.get('state')}")

    def close(self) -> None:
        self._closed.set()
        super().close()
        for client in (self._batch, self._logs):
            close = getattr(client, "close", None)
            if close is not None:
                close()

    # -- placement -------------------------------------------------------------

    @property
    def job_root(self) -> Path:
        return self.settings.batch_shared_dir

    @property
    def identity(self) -> str:
        # Runners of one account on other queues or shared folders are others.
        s = self.settings
        return f"aws-batch\0{s.batch_job_queue}\0{s.gpu_job_queue}\0{s.batch_shared_dir}"

    @property
    def in_flight(self) -> int:
        """How many jobs hold a place now."""
        with self._lock:
            return len(self._placements)

    def capacity(self) -> Capacity | None:
        s = self.settings
        free = s.batch_max_in_flight - self.in_flight
        if free <= 0:
            return None
        return BatchCapacity(
            memory=s.batch_max_memory,
            cpu_cores=s.batch_max_vcpus,
            gpus=s.batch_max_gpus,
            gpu_mem=s.batch_gpu_memory if s.batch_max_gpus else 0,
            gpu_model=s.batch_gpu_model if s.batch_max_gpus else None,
            gpu_archi=s.batch_gpu_archi if s.batch_max_gpus else None,
            limit=free,
            older_than=s.batch_older_than,
        )

    def unfit_reason(self, needs: HardwareSpec) -> str | None:
        s = self.settings
        gpus = gpus_needed(needs)
        if needs.cpu_cores is not None and needs.cpu_cores > s.batch_max_vcpus:
            return f"needs {needs.cpu_cores} vCPUs; Batch jobs here get at most {s.batch_max_vcpus}"
        if needs.memory is not None and needs.memory > s.batch_max_memory:
            return f"needs {needs.memory} MiB; Batch jobs here get at most {s.batch_max_memory} MiB"
        if gpus > s.batch_max_gpus:
            return f"needs {gpus} GPU(s); Batch jobs here get at most {s.batch_max_gpus}"
        if gpus and needs.gpu_mem is not None and needs.gpu_mem > s.batch_gpu_memory:
            return f"needs {needs.gpu_mem} MiB per GPU; the GPU queue's have {s.batch_gpu_memory}"
        for wanted, offered, what in (
            (needs.gpu_model, s.batch_gpu_model, "model"),
            (needs.gpu_archi, s.batch_gpu_archi, "architecture"),
        ):
            if wanted is not None and wanted != offered:
                return f"needs GPU {what} {wanted}; the GPU queue's is {offered or 'not set'}"
        return None

    def reserve(self, needs: HardwareSpec) -> Placement | None:
        if self.unfit_reason(needs) is not None:
            return None
        s = self.settings
        placement = Placement(
            memory=needs.memory or s.batch_default_memory,
            cpus=float(needs.cpu_cores or s.batch_default_vcpus),
            gpus=gpus_needed(needs),
        )
        with self._lock:
            if len(self._placements) >= s.batch_max_in_flight:
                return None
            self._placements.add(placement)
        return placement

    def release(self, placement: Placement) -> None:
        with self._lock:
            self._placements.discard(placement)

    # -- starting --------------------------------------------------------------

    def container_folder(self, folder: Path) -> str:
        """``folder`` (under ``BATCH_SHARED_DIR``) as the job's container sees it."""
        root = self.job_root
        if not folder.is_relative_to(root):
            raise BackendError(f"{folder} is not under BATCH_SHARED_DIR ({root})")
        return f"{SHARED_MOUNT}/{folder.relative_to(root).as_posix()}"

    def start(self, request: RunRequest) -> RunHandle:
        container = request.container
        if container.user is not None or container.read_only_root:
            # The /files prefix creates a link in the root folder, as root.
            raise BackendError(
                "AWS Batch runs jobs as the image's root user on a writable root file "
                "system; this tool's container asks for a user or a read-only root"
            )
        shape = Shape.of(request.image, request.placement, self.settings)
        definition = self._definitions.arn(shape)
        queue = self.settings.gpu_job_queue if shape.gpus else self.settings.batch_job_queue
        name = _job_name(request.folder)
        options: dict[str, Any] = {
            "jobName": name,
            "jobQueue": queue,
            "jobDefinition": definition,
            "containerOverrides": {
                "command": files_command(self.container_folder(request.folder), request.command),
                "environment": [{"name": k, "value": v} for k, v in request.env.items()],
            },
            "tags": {k: v[:TAG_VALUE_MAX] for k, v in request.labels.items()},
            "propagateTags": True,
        }
        if request.timeout:
            options["timeout"] = {"attemptDurationSeconds": self.attempt_duration(request.timeout)}
        job_id = self._submit(options)
        with self._lock:
            self._runs[job_id] = _Tracked()
        logger.info("submitted Batch job %s (%s) to %s", job_id, name, queue)
        return RunHandle(id=job_id, labels=dict(request.labels))

    def attempt_duration(self, timeout: int) -> int:
        """Batch's time limit of a job with ``timeout``: a backstop for a runner
        that died. The runner stops the job at its timeout, counted from when it
        saw the job RUNNING (up to a poll interval after Batch started counting),
        and gives it time to stop: Batch's limit comes after that. Batch's minimum
        is 60 s."""
        margin = BACKSTOP_MARGIN_S + math.ceil(2 * self.poll_interval)
        return max(MIN_ATTEMPT_DURATION_S, timeout + margin)

    def started(self, handle: RunHandle) -> bool:
        with self._lock:
            run = self._runs.get(handle.id)
            return run is not None and (run.status in STARTED_STATES or run.ended.is_set())

    def _submit(self, options: dict[str, Any]) -> str:
        for attempt in range(SUBMIT_RETRIES + 1):
            try:
                return str(self._batch.submit_job(**options)["jobId"])
            except ClientError as exc:
                if _error_code(exc) not in THROTTLING_CODES or attempt == SUBMIT_RETRIES:
                    raise BackendError(f"AWS Batch refused the job: {exc}") from exc
                pause = min(SUBMIT_BACKOFF_MAX_S, SUBMIT_BACKOFF_S * 2**attempt)
                pause *= random.uniform(0.5, 1.0)  # noqa: S311 (jitter, not secrecy)
                logger.warning("SubmitJob throttled, again in %.1f s", pause)
                if self._closed.wait(pause):
                    break
            except BotoCoreError as exc:
                raise BackendError(f"could not reach AWS Batch: {exc}") from exc
        raise BackendError("the backend closed while AWS Batch throttled SubmitJob")

    # -- following runs --------------------------------------------------------

    def describe(self, job_ids: Sequence[str]) -> list[dict[str, Any]]:
        """The descriptions of ``job_ids``: one DescribeJobs per 100."""
        jobs: list[dict[str, Any]] = []
        for first in range(0, len(job_ids), DESCRIBE_CHUNK):
            chunk = list(job_ids[first : first + DESCRIBE_CHUNK])
            try:
                jobs.extend(self._batch.describe_jobs(jobs=chunk).get("jobs", []))
            except (ClientError, BotoCoreError) as exc:
                raise BackendError(f"DescribeJobs failed: {exc}") from exc
        return jobs

    def poll(self, handles: Sequence[RunHandle]) -> Mapping[str, RunResult | BackendError]:
        ids = [handle.id for handle in handles]
        described = {job["jobId"]: job for job in self.describe(ids)}
        ended: dict[str, RunResult | BackendError] = {}
        for job_id in ids:
            job = described.get(job_id)
            if job is None:
                ended[job_id] = BackendError(f"AWS Batch does not know job {job_id}")
                self._mark_ended(job_id, None, None)
                continue
            status: str | None = str(job.get("status"))
            stream = (job.get("container") or {}).get("logStreamName")
            if status in ENDED_STATES:
                ended[job_id] = result_of(job, self._exit_code_of(job), self._stopping(job_id))
            elif status in WAITING_STATES and self._waited_too_long(job_id):
                ended[job_id] = self._give_up_waiting(job_id, status)
                status = None
            self._mark_ended(job_id, status, stream)
        return ended

    def _waited_too_long(self, job_id: str) -> bool:
        with self._lock:
            run = self._runs.get(job_id)
        if run is None:
            return False
        return time.monotonic() - run.submitted_at > self.settings.batch_max_queue_wait

    def _give_up_waiting(self, job_id: str, status: str) -> RunResult:
        """Terminate a job that waited too long for a place (a GPU job on a queue
        without GPU instances stays RUNNABLE for ever)."""
        waited = round(self.settings.batch_max_queue_wait)
        self._terminate(job_id, f"LabCloud: waited over {waited} s for a place ({status})")
        return RunResult(
            exit_code=UNKNOWN_EXIT,
            error=(
                f"AWS Batch found no place for the job in {waited} s (still {status}); "
                "do the job queue's compute environments offer what it needs?"
            ),
        )

    def _stopping(self, job_id: str) -> bool:
        with self._lock:
            run = self._runs.get(job_id)
            return run is not None and run.stopping

    def _mark_ended(self, job_id: str, status: str | None, stream: str | None) -> None:
        with self._lock:
            run = self._runs.get(job_id)
            if run is None:
                return
            if status is not None:
                run.status = status
            if stream:
                run.log_stream = stream
            if status is None or status in ENDED_STATES:
                run.ended.set()

    def _exit_code_of(self, job: Mapping[str, Any]) -> int | None:
        """The container's exit code: from the description, or, where the
        description lacks it (moto's DescribeJobs never has one; the real service
        has one for every container that ran), from the job's ListJobs summary."""
        code = (job.get("container") or {}).get("exitCode")
        if code is not None or job.get("status") != "FAILED":
            return int(code) if code is not None else None
        try:
            summaries = self._batch.list_jobs(
                jobQueue=job["jobQueue"],
                filters=[{"name": "JOB_NAME", "values": [job["jobName"]]}],
            ).get("jobSummaryList", [])
        except (ClientError, BotoCoreError, KeyError) as exc:
            logger.debug("no exit code for %s: %s", job.get("jobId"), exc)
            return None
        for summary in summaries:
            if summary.get("jobId") == job.get("jobId"):
                code = (summary.get("container") or {}).get("exitCode")
                return int(code) if code is not None else None
        return None

    def stream_logs(self, handle: RunHandle) -> Iterator[bytes]:
        """The job's CloudWatch stream, read every poll interval while the job
        runs (its name comes from the poller's DescribeJobs), then to its end."""
        token: str | None = None
        while not self._closed.is_set():
            with self._lock:
                run = self._runs.get(handle.id)
                stream = run.log_stream if run is not None else None
            if run is None:
                return
            ended = run.ended.is_set()
            events: list[dict[str, Any]] = []
            if stream is not None:
                events, token = self._log_events(stream, token)
                for event in events:
                    yield f"{event.get('message', '')}\n".encode()
            if events:
                continue
            if ended:
                return
            run.ended.wait(self.poll_interval)

    def _log_events(
        self, stream: str, token: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        options: dict[str, Any] = {
            "logGroupName": LOG_GROUP,
            "logStreamName": stream,
            "startFromHead": True,
        }
        if token is not None:
            options["nextToken"] = token
        try:
            response = self._logs.get_log_events(**options)
        except ClientError as exc:
            if _error_code(exc) == "ResourceNotFoundException":
                return [], token  # not written yet
            raise BackendError(f"cannot read the job's log: {exc}") from exc
        except BotoCoreError as exc:
            raise BackendError(f"cannot read the job's log: {exc}") from exc
        events = list(response.get("events", []))
        following = response.get("nextForwardToken")
        # At the end of a stream the service hands the same token back.
        return events, str(following) if following else token

    # -- ending runs -----------------------------------------------------------

    def stop(self, handle: RunHandle, grace: float = DEFAULT_STOP_GRACE_S) -> None:
        with self._lock:
            run = self._runs.get(handle.id)
            if run is not None:
                if run.ended.is_set():
                    return
                run.stopping = True
        self._terminate(handle.id, TERMINATE_REASON)

    def _terminate(self, job_id: str, reason: str) -> None:
        try:
            self._batch.terminate_job(jobId=job_id, reason=reason)
        except ClientError as exc:
            # A job Batch no longer knows is as good as terminated.
            if _error_code(exc) != "ClientException":
                raise BackendError(f"could not terminate Batch job {job_id}: {exc}") from exc
        except BotoCoreError as exc:
            raise BackendError(f"could not terminate Batch job {job_id}: {exc}") from exc

    def remove(self, handle: RunHandle) -> None:
        with self._lock:
            run = self._runs.get(handle.id)
            ended = run is not None and run.ended.is_set()
        if not ended:
            self._terminate(handle.id, TERMINATE_REASON if run else LEFTOVER_REASON)
        with self._lock:
            self._runs.pop(handle.id, None)

    def find_leftovers(self, labels: Mapping[str, str]) -> list[RunHandle]:
        """Jobs not yet ended, on this runner's queues, whose tags carry ``labels``:
        ListJobs per queue and state, then their tags from DescribeJobs."""
        ids: list[str] = []
        queues = sorted({self.settings.batch_job_queue, self.settings.gpu_job_queue})
        try:
            paginator = self._batch.get_paginator("list_jobs")
            for queue in queues:
                for status in ACTIVE_STATES:
                    for page in paginator.paginate(jobQueue=queue, jobStatus=status):
                        ids.extend(s["jobId"] for s in page.get("jobSummaryList", []))
        except (ClientError, BotoCoreError) as exc:
            raise BackendError(f"ListJobs failed: {exc}") from exc
        found = []
        for job in self.describe(list(dict.fromkeys(ids))):
            tags = job.get("tags") or {}
            if job.get("status") in ENDED_STATES:
                continue
            if all(tags.get(key) == value for key, value in labels.items()):
                found.append(RunHandle(id=str(job["jobId"]), labels=dict(tags)))
        return found
