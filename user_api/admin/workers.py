"""The connected workers, as the worker API knows them (its ``GET /_workers``)."""

from __future__ import annotations

from pydantic import ValidationError

from labcloud.errors import Unavailable
from user_api.admin.schemas import AdminWorker
from user_api.clients.worker_api import WorkerApiClient, WorkerApiError

# The worker API reads a few rows: an answer slower than this means trouble.
WORKERS_ANSWER_SECONDS = 10.0


class WorkerApiDown(Unavailable):
    """The worker API, which knows the connected workers, does not answer."""


async def connected_workers(client: WorkerApiClient) -> list[AdminWorker]:
    """The connected workers, by name; ``WorkerApiDown`` (503) when the worker API
    does not answer."""
    try:
        listed = await client.workers(answer_within=WORKERS_ANSWER_SECONDS)
        return [
            AdminWorker.model_validate(
                {
                    **worker,
                    "jobs": [
                        {"id": job["job_id"], "status": job["status"]} for job in worker["jobs"]
                    ],
                }
            )
            for worker in listed
        ]
    except (WorkerApiError, ValidationError, KeyError, TypeError) as exc:
        raise WorkerApiDown(
            f"the worker API does not say which workers are connected: {exc}"
        ) from exc
