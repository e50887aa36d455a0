"""``python -m user_api``: serve the user API with uvicorn."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from labcloud.settings import load_settings
from user_api.app import create_app
from user_api.settings import UserApiSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="user_api", description="Serve the LabCloud user API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--env-file", help="read settings from this file (default: .env)")
    args = parser.parse_args(argv)
    settings = load_settings(UserApiSettings, args.env_file)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
