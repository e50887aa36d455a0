"""A tiny application for the multi-process server's tests: it answers with the
process id that served the request. ``python -m tests.labcloud.serve_app PORT N``
serves it from N processes; its startup fails while the file named by
``SERVE_APP_FAIL_IF`` exists."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from labcloud.serve import serve_processes
from labcloud.web import uvicorn_log_config


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    if app.state.fail:
        raise RuntimeError("startup failed on purpose")
    yield


def create_app() -> FastAPI:
    app = FastAPI(lifespan=_lifespan)
    trigger = os.environ.get("SERVE_APP_FAIL_IF")
    app.state.fail = bool(trigger) and Path(str(trigger)).exists()

    @app.get("/pid")
    async def pid() -> int:
        return os.getpid()

    return app


if __name__ == "__main__":
    port, workers = int(sys.argv[1]), int(sys.argv[2])
    raise SystemExit(
        serve_processes(
            "tests.labcloud.serve_app:create_app",
            host="127.0.0.1",
            port=port,
            workers=workers,
            log_config=uvicorn_log_config("INFO"),
        )
    )
