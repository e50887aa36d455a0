"""``python -m worker_api [--host H] [--port P]``: serve the worker API with uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn
from pydantic import ValidationError

from worker_api.app import create_app
from worker_api.settings import WorkerApiSettings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker_api", description=__doc__)
    parser.add_argument("--host", help="interface to listen on (default: HOST setting)")
    parser.add_argument("--port", type=int, help="port to listen on (default: PORT setting)")
    args = parser.parse_args(argv)
    try:
        settings = WorkerApiSettings()
    except ValidationError as exc:
        # Name each setting and problem, never the values: they may be secrets.
        problems = "\n".join(
            f"  {'.'.join(str(part) for part in error['loc']).upper() or 'SETTINGS'}: "
            f"{error['msg']}"
            for error in exc.errors()
        )
        sys.exit(f"worker_api: invalid settings (environment or .env):\n{problems}")
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=args.host or settings.host,
        port=args.port or settings.port,
        log_level=settings.log_level.lower(),
    )


if __name__ == "__main__":
    main()
