"""``python -m user_api``: serve the user API with uvicorn."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from labcloud.db import is_sqlite
from labcloud.serve import PortInUse, serve_one_process, serve_processes
from labcloud.settings import load_settings
from labcloud.web import uvicorn_log_config
from user_api.app import ENV_FILE_VARIABLE, create_app
from user_api.settings import UserApiSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="user_api", description="Serve the LabCloud user API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--env-file", help="read settings from this file (default: .env)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes (more than one needs PostgreSQL)",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    # Checked here once, so that a bad setting stops the start with one message
    # rather than every worker process failing on its own.
    settings = load_settings(UserApiSettings, args.env_file)
    # Given to uvicorn, which applies it in every worker process too.
    log_config = uvicorn_log_config(settings.log_level)
    if args.workers == 1:
        return serve_one_process(
            create_app(settings), host=args.host, port=args.port, log_config=log_config
        )
    if is_sqlite(settings.resolved_database_url):
        parser.error("--workers > 1 needs PostgreSQL (DATABASE_URL): SQLite has one writer")
    if args.env_file:
        # Each worker process loads the settings itself, from the same file.
        os.environ[ENV_FILE_VARIABLE] = str(Path(args.env_file).resolve())
    try:
        return serve_processes(
            "user_api.app:create_app",
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_config=log_config,
        )
    except PortInUse as exc:
        parser.exit(1, f"user_api: {exc}\n")


if __name__ == "__main__":
    raise SystemExit(main())
