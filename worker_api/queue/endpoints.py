"""Queue routes: workers pull jobs and report status; the user API enqueues and
cancels (internal key)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from fastapi import APIRouter, Body, Depends, Query, Request, Response, status
from pydantic import ValidationError

from labcloud.contract import JobSpecs, JobStatus, QueueJob, StatusReport
from labcloud.errors import LabCloudError, PayloadTooLarge
from labcloud.web import INT64_MAX, IdPath
from worker_api.dependencies import (
    CurrentWorker,
    InternalCaller,
    PullerDep,
    QueuePolicyDep,
    QueueSignalsDep,
    SessionDep,
    SettingsDep,
    worker_environment,
)
from worker_api.queue import service
from worker_api.queue.schemas import EnqueuedJob, WorkerOffer, offered_gpus
from worker_api.workers.dependencies import PresenceDep

router = APIRouter(tags=["queue"])

# Bounds of a pull's query (README "Request limits"): beyond any real machine, and
# inside the database's 64-bit integers and Python's time arithmetic, where larger
# values used to fail with OverflowError (a 500).
MAX_OFFER = INT64_MAX
MAX_AGE_SECONDS = 100 * 365 * 24 * 3600.0
MAX_NAME_LENGTH = 128
MAX_GROUPS = 64
# A status's details are the tail of a job's log; the worker sends them in the URL.
MAX_RUNTIME_DETAILS = 65536
# A status report's body is one outcome, whose log tail is at most 4,000 characters
# (up to 6 bytes each, escaped in JSON): far below this.
MAX_STATUS_REPORT_BYTES = 64 * 1024
internal_router = APIRouter(tags=["internal"], dependencies=[InternalCaller])


@router.get("/jobs", response_model=dict[str, JobSpecs])
async def pull_jobs(
    request: Request,
    worker: CurrentWorker,
    puller: PullerDep,
    presence: PresenceDep,
    settings: SettingsDep,
    memory: Annotated[int, Query(ge=0, le=MAX_OFFER, description="Memory the worker offers, MiB.")],
    cpu_cores: Annotated[int, Query(ge=1, le=MAX_OFFER)] = 1,
    gpu_mem: Annotated[
        int | None, Query(ge=0, le=MAX_OFFER, description="GPU memory, MiB.")
    ] = None,
    gpu_memory: Annotated[
        int | None,
        Query(ge=0, le=MAX_OFFER, description="Alias of gpu_mem (the upstream worker's name)."),
    ] = None,
    gpu_model: Annotated[str | None, Query(max_length=MAX_NAME_LENGTH)] = None,
    gpu_archi: Annotated[str | None, Query(max_length=MAX_NAME_LENGTH)] = None,
    gpus: Annotated[
        int | None,
        Query(
            ge=0,
            le=MAX_OFFER,
            description=(
                "Extension: free GPUs offered (default: 1 when gpu_mem > 0, else 0). "
                "Jobs that need a GPU only go to a pull offering enough of them."
            ),
        ),
    ] = None,
    groups: Annotated[list[str] | None, Query(max_length=MAX_GROUPS)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 1,
    older_than: Annotated[
        float,
        Query(ge=0, le=MAX_AGE_SECONDS, description="Seconds (jobs for any environment)."),
    ] = 0,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=MAX_AGE_SECONDS,
            description="Long-poll: seconds to wait for a job (capped).",
        ),
    ] = 0,
) -> dict[str, JobSpecs]:
    """Lease up to ``limit`` matching jobs to the calling worker: ``{queue id: spec}``,
    ``{}`` when none matched within ``wait`` seconds."""
    offered_gpu_mem = gpu_mem if gpu_mem is not None else gpu_memory or 0
    offer = WorkerOffer(
        name=worker.name,
        environment=worker_environment(worker),
        memory=memory,
        cpu_cores=cpu_cores,
        gpu_mem=offered_gpu_mem,
        gpu_model=gpu_model,
        gpu_archi=gpu_archi,
        gpus=offered_gpus(gpus, offered_gpu_mem),
    )
    await presence.pulled(offer, groups=worker.groups, older_than=older_than)
    leased = await puller.pull(
        offer,
        limit=limit,
        older_than=older_than,
        wait=min(wait, settings.max_wait_seconds),
        caller_gone=request.is_disconnected,
    )
    return {str(job.queue_id): job.spec for job in leased}


@router.get("/jobs/{queue_id}/status")
def job_status(queue_id: IdPath, _worker: CurrentWorker, session: SessionDep) -> JobStatus:
    """The job's status, e.g. ``"running"``."""
    return service.status_of(session, queue_id)


class InvalidStatusReport(LabCloudError):
    """The status report's body is not a valid ``StatusReport``."""

    status_code: ClassVar[int] = 422


async def status_report_body(request: Request) -> StatusReport | None:
    """The optional JSON body of a status report (DECODE's worker sends none), read
    up to ``MAX_STATUS_REPORT_BYTES``: 413 beyond, 422 when it is not a
    ``StatusReport``."""
    declared = request.headers.get("content-length", "")
    too_large = PayloadTooLarge(
        f"a status report's body is at most {MAX_STATUS_REPORT_BYTES:,} bytes"
    )
    if declared.isdigit() and int(declared) > MAX_STATUS_REPORT_BYTES:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_STATUS_REPORT_BYTES:
            raise too_large
    if not body.strip():
        return None
    try:
        return StatusReport.model_validate_json(bytes(body))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}"
            for error in exc.errors(include_url=False)
        )
        raise InvalidStatusReport(f"invalid status report body: {problems}") from exc


def _inlined(schema: Any, definitions: dict[str, Any]) -> Any:
    """``schema`` with its ``#/$defs/...`` references replaced by the definitions
    (an OpenAPI document resolves ``#`` against itself, not against the schema)."""
    if isinstance(schema, dict):
        reference = schema.get("$ref")
        if isinstance(reference, str) and reference.startswith("#/$defs/"):
            return _inlined(definitions[reference.removeprefix("#/$defs/")], definitions)
        return {key: _inlined(value, definitions) for key, value in schema.items()}
    if isinstance(schema, list):
        return [_inlined(item, definitions) for item in schema]
    return schema


_report_schema = StatusReport.model_json_schema()
_report_definitions = _report_schema.pop("$defs", {})
# The body is read by ``status_report_body`` (bounded, optional); declared here.
_STATUS_REPORT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": False,
        "description": (
            "Extension: how the attempt ended, sent with a terminal status "
            f"(at most {MAX_STATUS_REPORT_BYTES:,} bytes)."
        ),
        "content": {"application/json": {"schema": _inlined(_report_schema, _report_definitions)}},
    }
}


@router.put(
    "/jobs/{queue_id}/status",
    status_code=status.HTTP_204_NO_CONTENT,
    openapi_extra=_STATUS_REPORT_BODY,
)
def report_status(
    queue_id: IdPath,
    worker: CurrentWorker,
    session: SessionDep,
    policy: QueuePolicyDep,
    presence: PresenceDep,
    report: Annotated[StatusReport | None, Depends(status_report_body)],
    status_: Annotated[JobStatus, Query(alias="status")],
    runtime_details: Annotated[str | None, Query(max_length=MAX_RUNTIME_DETAILS)] = None,
) -> Response:
    """Report the job's status; the same status again is the keep-alive. 404 means
    the worker no longer holds the job and must abandon it."""
    presence.kept_alive(session, worker.name)
    service.report_status(
        session,
        queue_id,
        policy=policy,
        worker=worker.name,
        status=status_,
        runtime_details=runtime_details,
        outcome=report.outcome if report is not None else None,
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@internal_router.post("/_jobs", status_code=status.HTTP_201_CREATED, response_model=EnqueuedJob)
def enqueue(job: QueueJob, session: SessionDep, signals: QueueSignalsDep) -> EnqueuedJob:
    """Enqueue a job (from the user API); a repeat returns the job already queued."""
    queued = service.enqueue(session, job, signals=signals)
    return EnqueuedJob(id=queued.id, job_id=queued.job_id, status=queued.status)


# The most jobs one batch may carry: bounds the request body and the statement.
MAX_BATCH = 500


@internal_router.post("/_jobs/batch", response_model=list[EnqueuedJob])
def enqueue_batch(
    jobs: Annotated[list[QueueJob], Body(max_length=MAX_BATCH)],
    session: SessionDep,
    signals: QueueSignalsDep,
) -> list[EnqueuedJob]:
    """Extension: enqueue several jobs in one transaction (idempotent like ``POST
    /_jobs``); one invalid job refuses the whole batch with 422."""
    return service.enqueue_many(session, jobs, signals=signals)


@internal_router.delete("/_jobs/{job_id}", status_code=status.HTTP_204_NO_CONTENT)
def cancel(
    job_id: IdPath,
    session: SessionDep,
    policy: QueuePolicyDep,
    discard_outputs: Annotated[
        bool,
        Query(
            description=(
                "True when the job is being deleted: its worker may upload nothing more. "
                "False keeps the log the worker uploads after stopping the run."
            )
        ),
    ] = False,
) -> Response:
    """Cancel the job with this user API id if it is still active (idempotent)."""
    service.cancel(session, job_id, policy=policy, discard_outputs=discard_outputs)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
