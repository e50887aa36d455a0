"""``labcloud up --env-file FILE``: settings given to every service of the stack.

The file has the format of ``.env`` (``KEY=value``, ``#`` comments, quotes), read with
the parser the services themselves use for ``.env``. Its values reach the user API,
the worker API and the runners as environment variables, so they take precedence over
the stack's defaults (a PostgreSQL ``DATABASE_URL``, ``SIGNUP_REQUIRES_APPROVAL``,
``BACKEND``...) and over any ``.env`` file.

Two kinds of names are refused, before anything starts:

- names that are no setting of any service (a typo would otherwise be ignored by every
  service without a word), except ``AWS_*`` variables, which boto3 reads;
- names that ``labcloud up`` sets itself because they wire the processes together
  (each API's public URL, the runners' accounts), with ``--aws-emulator`` those
  the emulator's resources decide, and with ``--backend aws-batch`` the runners'
  backend and its Batch resources; the message says why or names the option to use.
"""

from __future__ import annotations

from pathlib import Path

from dotenv import dotenv_values
from pydantic_settings import BaseSettings

from labcloud_cli.stack.processes import StartupError

# Names ``labcloud up`` sets per process, and what to use instead.
WIRED_BY_THE_STACK: dict[str, str] = {
    "PUBLIC_URL": "--advertise-address and the port options",
    "WORKERFACING_API_URL": "--advertise-address and --worker-port",
    "USERFACING_API_URL": "--user-port",
    "API_URL": "--worker-port (each runner's file in DIR/runners/)",
    "AUTH_URL": "--user-port (each runner's file in DIR/runners/)",
    "USERNAME": "one account per runner, made by labcloud up",
    "PASSWORD": "one account per runner, made by labcloud up",
}
# Names the AWS emulator's resources decide (``--aws-emulator``).
WIRED_BY_THE_EMULATOR: frozenset[str] = frozenset(
    {
        "AUTH",
        "FILESYSTEM",
        "APPLICATION_CONFIG_FILE",
        "S3_BUCKET",
        "S3_REGION",
        "S3_ENDPOINT_URL",
        "INTERNAL_API_KEY_SECRET",
        "COGNITO_CLIENT_ID",
        "COGNITO_SECRET",
        "COGNITO_USER_POOL_ID",
        "COGNITO_REGION",
        "COGNITO_JWKS_URL",
        "COGNITO_ISSUER",
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
    }
)

# Names ``--backend aws-batch`` decides: the runners' backend and the emulator's Batch
# resources (a runner's environment overrides its file, so the file's values would lose).
WIRED_BY_BATCH: frozenset[str] = frozenset(
    {
        "BACKEND",
        "BATCH_JOB_QUEUE",
        "BATCH_GPU_JOB_QUEUE",
        "BATCH_SHARED_DIR",
        "BATCH_EFS_FILE_SYSTEM_ID",
    }
)


def known_settings() -> frozenset[str]:
    """Every setting name of the user API, the worker API, the runner and its backends."""
    # Imported here: only `labcloud up --env-file` needs the services' settings classes.
    from user_api.settings import UserApiSettings
    from worker_api.settings import WorkerApiSettings
    from worker_runner.backends.registry import BACKENDS
    from worker_runner.settings import WorkerSettings

    classes: list[type[BaseSettings]] = [UserApiSettings, WorkerApiSettings, WorkerSettings]
    classes += [entry.settings for entry in BACKENDS.values()]
    return frozenset(name.upper() for cls in classes for name in cls.model_fields)


def read_stack_env_file(
    path: Path, *, aws_emulator: bool, aws_batch: bool = False
) -> dict[str, str]:
    """The settings of ``path`` for every service; ``StartupError`` naming each name
    that is unknown or set by ``labcloud up`` itself (never a value: it may be secret)."""
    if not path.is_file():
        raise StartupError(f"--env-file {path}: no such file")
    try:
        raw = dotenv_values(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise StartupError(f"--env-file {path}: cannot be read ({exc})") from None
    values: dict[str, str] = {}
    problems: list[str] = []
    known = known_settings()
    for name, value in raw.items():
        key = name.upper()
        if value is None:
            problems.append(f"{name}: no value (write {name}=VALUE)")
        elif key in WIRED_BY_THE_STACK:
            problems.append(f"{name}: set by labcloud up; use {WIRED_BY_THE_STACK[key]}")
        elif aws_emulator and (key in WIRED_BY_THE_EMULATOR or key.startswith("AWS_ENDPOINT_URL")):
            problems.append(f"{name}: set by --aws-emulator to the emulator's resources")
        elif aws_batch and key in WIRED_BY_BATCH:
            problems.append(f"{name}: set by --backend aws-batch to the emulator's Batch")
        elif key == "BACKEND" and value.strip().lower() == "aws-batch":
            # The runners would start without a queue or a shared folder.
            problems.append(f"{name}: use --backend aws-batch (with --aws-emulator)")
        elif key not in known and not key.startswith("AWS_"):
            problems.append(f"{name}: not a setting of the user API, the worker API or a runner")
        else:
            values[key] = value
    if problems:
        raise StartupError(f"--env-file {path}:\n  " + "\n  ".join(problems))
    return values
