"""Wire contracts shared by the user API, the worker API and the worker runner.

Everything that crosses a process boundary is defined here once: the job status
enum and its transition table, the job specification a worker receives
(``JobSpecs``), the message the user API sends to enqueue a job (``QueueJob``) and
the pre-signed request object handed to clients that must move files without a
bearer token (``SignedRequest``). The field names follow DECODE OpenCloud's HTTP
contract so its clients keep working unchanged.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class JobStatus(StrEnum):
    """Life cycle of a job; see ``ALLOWED_TRANSITIONS`` for the legal moves."""

    QUEUED = "queued"
    PULLED = "pulled"
    PREPROCESSING = "preprocessing"
    RUNNING = "running"
    POSTPROCESSING = "postprocessing"
    FINISHED = "finished"
    ERROR = "error"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES

    @property
    def is_active(self) -> bool:
        return self not in TERMINAL_STATUSES


TERMINAL_STATUSES: frozenset[JobStatus] = frozenset(
    {JobStatus.FINISHED, JobStatus.ERROR, JobStatus.CANCELED}
)
ACTIVE_STATUSES: frozenset[JobStatus] = frozenset(set(JobStatus) - TERMINAL_STATUSES)
# Statuses in which a worker holds the job (its lease must be kept alive).
LEASED_STATUSES: frozenset[JobStatus] = frozenset(ACTIVE_STATUSES - {JobStatus.QUEUED})

_PROGRESS: tuple[JobStatus, ...] = (
    JobStatus.QUEUED,
    JobStatus.PULLED,
    JobStatus.PREPROCESSING,
    JobStatus.RUNNING,
    JobStatus.POSTPROCESSING,
    JobStatus.FINISHED,
)


def _build_transitions() -> dict[JobStatus, frozenset[JobStatus]]:
    """Forward moves along the progress line (phases may be skipped, never
    revisited), ``error``/``canceled`` from any active state, and the re-queue of a
    job whose worker went silent before it started uploading."""
    allowed: dict[JobStatus, set[JobStatus]] = {status: set() for status in JobStatus}
    for index, status in enumerate(_PROGRESS[:-1]):
        allowed[status].update(_PROGRESS[index + 1 :])
        allowed[status].update({JobStatus.ERROR, JobStatus.CANCELED})
    for status in (JobStatus.PULLED, JobStatus.PREPROCESSING, JobStatus.RUNNING):
        allowed[status].add(JobStatus.QUEUED)
    return {status: frozenset(targets) for status, targets in allowed.items()}


ALLOWED_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = _build_transitions()


def allowed_sources(target: JobStatus) -> frozenset[JobStatus]:
    """The statuses from which ``target`` may be reached: the ``IN (...)`` list of a
    guarded compare-and-set ``UPDATE``."""
    return frozenset(src for src, targets in ALLOWED_TRANSITIONS.items() if target in targets)


def can_transition(source: JobStatus, target: JobStatus) -> bool:
    return target in ALLOWED_TRANSITIONS[source]


class Environment(StrEnum):
    """Where a job may run. ``None`` on a job means "anywhere"."""

    CLOUD = "cloud"
    LOCAL = "local"


class FileArea(StrEnum):
    """Top-level folders of a user's storage root."""

    CONFIG = "config"
    DATA = "data"
    ARTIFACT = "artifact"
    OUTPUT = "output"
    LOG = "log"


# Areas a user may upload into; outputs and logs are written by jobs only.
UPLOAD_AREAS: frozenset[FileArea] = frozenset({FileArea.CONFIG, FileArea.DATA, FileArea.ARTIFACT})


class OutputKind(StrEnum):
    """Keys of ``files_up`` / ``paths_upload``: where a job's results go."""

    OUTPUT = "output"
    LOG = "log"
    ARTIFACT = "artifact"


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class HardwareSpec(_Wire):
    """What a job needs (or, from a worker, what it offers). Memory in MiB."""

    cpu_cores: int | None = Field(default=None, ge=1)
    memory: int | None = Field(default=None, ge=1)
    gpu_model: str | None = None
    gpu_archi: str | None = None
    gpu_mem: int | None = Field(default=None, ge=0)
    # Extension: the number of GPUs a job needs / a worker offers. A job that sets
    # any other GPU field needs at least one even when this is unset.
    gpus: int | None = Field(default=None, ge=0)


class AppSpec(_Wire):
    cmd: list[str]
    env: dict[str, str] = Field(default_factory=dict)


class HandlerSpec(_Wire):
    image_url: str
    image_name: str | None = None
    image_version: str | None = None
    entrypoint: str | None = None
    # "<mount dir>/<relative path>" -> input URI (a storage key, one per file).
    files_down: dict[str, str] = Field(default_factory=dict)
    # output kind -> folder under /files whose files are uploaded after the run.
    files_up: dict[OutputKind, str] = Field(default_factory=dict)


class ContainerSpec(_Wire):
    """Extension: how far the job's container is confined beyond the runner's
    defaults, from the catalog entrypoint's ``container`` section."""

    # Most processes and threads the container may run; None: the runner's
    # ``CONTAINER_PIDS_LIMIT``.
    pids_limit: int | None = Field(default=None, ge=1, le=1_000_000)
    # "uid" or "uid:gid" to run as instead of the image's user (None: the image's).
    user: str | None = Field(default=None, pattern=r"^[0-9]{1,10}(:[0-9]{1,10})?$")
    # Mount the image's root file system read-only (``/files`` and ``/tmp`` stay
    # writable).
    read_only_root: bool = False


class MetaSpec(_Wire):
    job_id: int
    date_created: datetime


class JobSpecs(_Wire):
    """What a worker receives for a leased job."""

    app: AppSpec
    handler: HandlerSpec
    meta: MetaSpec
    hardware: HardwareSpec = Field(default_factory=HardwareSpec)
    # Extension: seconds after which the run is stopped (catalog ``timeout``).
    timeout: int | None = None
    # Extension: container confinement (catalog ``container``).
    container: ContainerSpec = Field(default_factory=ContainerSpec)


class PathsUpload(_Wire):
    output: str
    log: str
    artifact: str

    def for_kind(self, kind: OutputKind) -> str:
        return str(getattr(self, kind.value))


class QueueJob(_Wire):
    """The user API's request to enqueue a job on the worker API."""

    job: JobSpecs
    environment: Environment | None = None
    group: str | None = None
    priority: int = Field(default=0, ge=0, le=5)
    paths_upload: PathsUpload


class SignedRequest(BaseModel):
    """Keyword arguments of one HTTP request that needs no bearer token.

    Exactly these four keys: the upstream worker passes the object as keyword
    arguments to its HTTP client."""

    model_config = ConfigDict(extra="forbid")

    method: str
    url: str
    headers: dict[str, str] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)


class FailureKind(StrEnum):
    """Why a job did not finish, as far as LabCloud can tell."""

    # The tool failed: non-zero exit, out of its memory limit, bad results.
    USER_ERROR = "user_error"
    # LabCloud or the host failed: image pull, storage, the engine, a refused queue.
    SYSTEM_ERROR = "system_error"
    CANCELED = "canceled"
    TIMED_OUT = "timed_out"
    # The worker holding it went silent and the job could not be retried.
    LOST = "lost"


# The most characters of log kept in an outcome (the whole log is a file).
OUTCOME_LOG_TAIL_CHARS = 4000


class Outcome(_Wire):
    """Extension: how one attempt of a job ended, beside the free-text
    ``runtime_details``. Sent by the runner with a terminal status, completed by the
    worker API (attempt number, ``lost``), stored and shown by the user API."""

    exit_code: int | None = None
    # None when the job finished.
    failure: FailureKind | None = None
    # 1 for the first run; a job re-queued after its worker was lost runs again.
    attempt: int | None = Field(default=None, ge=1)
    started_at: datetime | None = None
    ended_at: datetime | None = None
    log_tail: str | None = Field(default=None, max_length=OUTCOME_LOG_TAIL_CHARS)
    # Where the attempt ran: the worker (runner account) name, its execution
    # backend (``docker``, ``aws-batch``) and the run's id there (a container id,
    # a Batch job id). Unset by older runners.
    runner: str | None = Field(default=None, max_length=256)
    backend: str | None = Field(default=None, max_length=64)
    run_id: str | None = Field(default=None, max_length=256)


class StatusReport(_Wire):
    """Extension: the optional JSON body of a worker's ``PUT /jobs/{id}/status``
    (DECODE's worker sends none; its query parameters stay the status)."""

    outcome: Outcome | None = None


class StatusUpdate(_Wire):
    """Body of the worker API's callback ``PUT /_job_status`` on the user API."""

    job_id: int
    status: JobStatus
    runtime_details: str | None = None
    # Extension: set with terminal statuses.
    outcome: Outcome | None = None


class Group(StrEnum):
    USERS = "users"
    WORKERS = "workers"
    CLOUD = "cloud"
    ADMINS = "admins"


# The user API's admin routes show it; ``labcloud admin`` filters by it.
class AccountStatus(StrEnum):
    """Where an account stands: waiting for approval, usable, or disabled."""

    PENDING = "pending"
    ACTIVE = "active"
    DISABLED = "disabled"


INTERNAL_API_KEY_HEADER = "x-api-key"


# -- live logs and progress (runner → worker API → user API) ------------------------

# A tool reports progress with stdout lines ``LABCLOUD_PROGRESS <fraction> <message>``
# (docs/tools.md); the runner parses them, the job shows the latest.
PROGRESS_PREFIX = "LABCLOUD_PROGRESS"
PROGRESS_MESSAGE_CHARS = 500
# The longest line the runner looks at for progress: a longer one is log, not progress.
PROGRESS_LINE_BYTES = 4096
# Headers of a live log's answer, on both APIs: where to resume, and whether the
# log is complete (the job ended and everything shipped is in).
LOG_NEXT_OFFSET_HEADER = "X-Log-Next-Offset"
LOG_COMPLETE_HEADER = "X-Log-Complete"


class Progress(_Wire):
    """A job's latest progress report: ``fraction`` of the work done (0 to 1, or
    ``None`` for a message alone) and a short ``message``."""

    fraction: float | None = Field(default=None, ge=0, le=1)
    message: str | None = Field(default=None, max_length=PROGRESS_MESSAGE_CHARS)


def parse_progress(line: bytes) -> Progress | None:
    """The progress a log line reports, or ``None`` when it is not a well-formed
    ``LABCLOUD_PROGRESS <fraction> [message]`` line. The fraction may be ``-`` (a
    message without a fraction); values outside 0..1 are clamped."""
    if len(line) > PROGRESS_LINE_BYTES:
        return None
    text = line.decode("utf-8", errors="replace").strip()
    parts = text.split(None, 2)
    if len(parts) < 2 or parts[0] != PROGRESS_PREFIX:
        return None
    fraction: float | None
    if parts[1] == "-":
        fraction = None
    else:
        try:
            fraction = float(parts[1])
        except ValueError:
            return None
        if fraction != fraction:  # NaN
            return None
        fraction = min(1.0, max(0.0, fraction))
    message = parts[2][:PROGRESS_MESSAGE_CHARS] if len(parts) > 2 else None
    return Progress(fraction=fraction, message=message)
