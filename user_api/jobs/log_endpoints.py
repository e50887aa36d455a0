"""``GET /jobs/{id}/logs``: a job's live log, read or followed (extension)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from labcloud.contract import LOG_COMPLETE_HEADER, LOG_NEXT_OFFSET_HEADER
from labcloud.web import INT64_MAX, IdPath
from user_api.dependencies import CurrentUserOutsideTransactions, WorkerApiDep
from user_api.jobs import logs

router = APIRouter(tags=["jobs"])

TEXT = "text/plain; charset=utf-8"


@router.get(
    "/jobs/{job_id}/logs",
    response_class=Response,
    responses={200: {"content": {TEXT: {}}, "description": "The log's bytes from offset."}},
)
async def get_job_logs(
    request: Request,
    job_id: IdPath,
    user: CurrentUserOutsideTransactions,
    client: WorkerApiDep,
    offset: Annotated[
        int, Query(ge=0, le=INT64_MAX, description="Byte to start from (X-Log-Next-Offset).")
    ] = 0,
    follow: Annotated[
        bool,
        Query(
            description=(
                "Stream the log as it grows (chunked text/plain) until the job ends, or "
                "for at most 10 minutes; reconnect with the offset reached."
            )
        ),
    ] = False,
) -> Response:
    """One of your jobs' live log while it runs, and after (the final log file under
    ``log/`` stays as well): the bytes from ``offset``, at most 1 MiB, with
    ``X-Log-Next-Offset`` (the offset to ask next) and ``X-Log-Complete`` (true
    once the job ended and every chunk is in). A job not started yet has an empty
    log. 404 when the job is not yours. A log over the server's limit ends with a
    marker line. Progress lines (``LABCLOUD_PROGRESS``) are in the log too."""
    factory = request.app.state.session_factory
    if follow:
        stream = await logs.start_follow(
            logs.follow(factory, client, user=user, job_id=job_id, offset=offset)
        )
        return StreamingResponse(
            stream,
            media_type=TEXT,
            # Proxies must pass lines on as they come.
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    answer = await logs.read(factory, client, user=user, job_id=job_id, offset=offset)
    return Response(
        content=answer.data,
        media_type=TEXT,
        headers={
            LOG_NEXT_OFFSET_HEADER: str(answer.next_offset),
            LOG_COMPLETE_HEADER: "true" if answer.complete else "false",
        },
    )
