"""The ``labcloud`` command's parser: one subcommand group per module, each adding its
commands with ``register`` and naming the function that runs them (``run``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from labcloud_cli.admin import commands as admin
from labcloud_cli.errors import ExitCode
from labcloud_cli.stack import commands as stack
from labcloud_cli.user import commands as user

Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]
# In the order `labcloud --help` lists them.
COMMAND_GROUPS: tuple[Register, ...] = (stack.register, user.register, admin.register)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="labcloud",
        description="Run LabCloud on this machine, add runners, use a running instance "
        "(log in, upload, run jobs, follow them, download results), administer it. "
        "Each command has its own --help.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMAND_GROUPS:
        register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``labcloud`` command; its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
