"""``python -m worker_api``: serve the worker API with uvicorn."""

from __future__ import annotations

import argparse

from labcloud.serve import serve_one_process
from labcloud.settings import load_settings
from labcloud.web import uvicorn_log_config
from worker_api.app import create_app
from worker_api.settings import WorkerApiSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="worker_api", description="Serve the LabCloud worker API."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--env-file", help="read settings from this file (default: .env)")
    args = parser.parse_args(argv)
    settings = load_settings(WorkerApiSettings, args.env_file)
    return serve_one_process(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_config=uvicorn_log_config(settings.log_level),
    )


if __name__ == "__main__":
    raise SystemExit(main())
