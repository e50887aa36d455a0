"""The ``WorkerPresence`` of this process (``app.state.worker_presence``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from worker_api.workers.presence import WorkerPresence


async def get_presence(request: Request) -> WorkerPresence:
    presence: WorkerPresence = request.app.state.worker_presence
    return presence


PresenceDep = Annotated[WorkerPresence, Depends(get_presence)]
