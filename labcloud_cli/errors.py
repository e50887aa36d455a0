"""Exit codes and the errors that choose them, shared by every subcommand that talks to
a server.

    LabCloudCliError
    ├── UsageError   the command line is wrong          exit 2
    ├── Refused      the server answered with an error  exit 1
    └── NotLoggedIn  no valid login (none, expired, or  exit 4
                     the credentials were refused)

A server that cannot be reached surfaces as ``httpx.TransportError`` (exit 3).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What ``labcloud`` returns to the shell."""

    OK = 0
    REFUSED = 1
    USAGE = 2
    UNREACHABLE = 3
    NOT_LOGGED_IN = 4
    # ``labcloud run --wait``: the job ended in ``error`` or ``canceled``.
    JOB_FAILED = 5


class LabCloudCliError(Exception):
    """A command could not be carried out."""

    exit_code = ExitCode.REFUSED


class UsageError(LabCloudCliError):
    """The command line is wrong."""

    exit_code = ExitCode.USAGE


class Refused(LabCloudCliError):
    """The server answered with an error; the message is the server's."""

    exit_code = ExitCode.REFUSED


class NotLoggedIn(LabCloudCliError):
    """No token for the server, an expired one, or a login the server refused."""

    exit_code = ExitCode.NOT_LOGGED_IN
