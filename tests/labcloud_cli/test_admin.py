"""``labcloud admin`` against a real user API process on loopback (self-signup
with approval): its commands, tables, files and exit codes."""

from __future__ import annotations

import json
import secrets
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from labcloud.auth.local import generate_private_key_pem
from labcloud_cli.admin.commands import parse_size
from labcloud_cli.admin.formatting import ran_on
from labcloud_cli.errors import ExitCode
from labcloud_cli.main import main
from labcloud_cli.output import human_bytes, table
from tests.e2e.stack import Process, free_port, wait_ready
from worker_runner.settings import load_settings

PASSWORD = "correct-horse-1"
ADMIN = "admin@example.org"
CATALOG = Path(__file__).resolve().parents[1] / "data" / "application_config.yaml"
APP = {"application": "demo", "version": "latest", "entrypoint": "wordcount"}


@dataclass
class Server:
    url: str
    process: Process


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("admin-cli")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = Process(
        "user-api",
        ["user_api", "--port", str(port)],
        {
            "INTERNAL_API_KEY_SECRET": secrets.token_urlsafe(24),
            "USER_DATA_ROOT_PATH": str(root / "data"),
            "DATABASE_URL": f"sqlite:///{root / 'user_api.db'}",
            "LOCAL_AUTH_PRIVATE_KEY": generate_private_key_pem(),
            "PUBLIC_URL": url,
            # Nothing listens there: jobs stay queued, which is all these tests need.
            "WORKERFACING_API_URL": "http://127.0.0.1:9",
            "APPLICATION_CONFIG_FILE": str(CATALOG),
            "ALLOW_SELF_SIGNUP": "true",
            "SIGNUP_REQUIRES_APPROVAL": "true",
            "BOOTSTRAP_ADMIN_EMAIL": ADMIN,
            "BOOTSTRAP_ADMIN_PASSWORD": PASSWORD,
        },
        root,
    )
    process.start()
    try:
        wait_ready(url, process)
        yield Server(url, process)
    finally:
        process.stop()


@pytest.fixture
def admin(
    server: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Admin:
    monkeypatch.setenv("LABCLOUD_ADMIN_PASSWORD", PASSWORD)
    return Admin(server, capsys)


@dataclass
class Result:
    code: int
    out: str
    err: str


class Admin:
    """Runs ``labcloud admin --url ... --email admin ... <args>`` in this process."""

    def __init__(self, server: Server, capsys: pytest.CaptureFixture[str]) -> None:
        self.server = server
        self.capsys = capsys

    def __call__(self, *args: str) -> Result:
        self.capsys.readouterr()
        code = main(["admin", "--url", self.server.url, "--email", ADMIN, *args])
        captured = self.capsys.readouterr()
        return Result(code, captured.out, captured.err)

    def ok(self, *args: str) -> str:
        result = self(*args)
        assert result.code == 0, result
        return result.out


def signup(server: Server, email: str) -> dict[str, str]:
    created = httpx.post(f"{server.url}/user", data={"username": email, "password": PASSWORD})
    assert created.status_code == 201, created.text
    token = httpx.post(f"{server.url}/token", data={"username": email, "password": PASSWORD})
    return {"Authorization": f"Bearer {token.json()['id_token']}"}


def column_of(table: str, header: str, row_start: str, *, right: bool = False) -> str:
    """The cell under ``header`` in the row starting with ``row_start``: found only
    when the column is aligned (left, or ``right`` for numbers) with its header."""
    lines = table.splitlines()
    start = lines[0].index(header)
    [row] = [line for line in lines if line.startswith(row_start)]
    if right:
        return row[: start + len(header)].split("  ")[-1].strip()
    return row[start:].split("  ")[0]


def test_users_table_and_approval(server: Server, admin: Admin) -> None:
    ada = signup(server, "cli-ada@example.org")
    assert httpx.get(f"{server.url}/user", headers=ada).status_code == 403  # pending
    table = admin.ok("users", "--status", "pending")
    assert table.splitlines()[0].split() == [
        "EMAIL",
        "STATUS",
        "GROUPS",
        "CREATED",
        "ACTIVE",
        "JOBS",
        "STORED",
    ]
    assert column_of(table, "STATUS", "cli-ada@") == "pending"
    assert column_of(table, "GROUPS", "cli-ada@") == "users"
    approved = admin.ok("approve", "cli-ada@example.org")
    assert approved.startswith("approved cli-ada@example.org")
    assert column_of(approved.split("\n\n", 1)[1], "STATUS", "cli-ada@") == "active"
    assert httpx.get(f"{server.url}/user", headers=ada).status_code == 200
    assert "cli-ada" not in admin.ok("users", "--status", "pending")
    assert admin.ok("users", "--search", "no-such-person") == "no accounts match\n"
    everyone = admin.ok("users")
    assert column_of(everyone, "STORED", ADMIN, right=True) == "0 B / 100.0 GiB"
    assert column_of(everyone, "ACTIVE JOBS", ADMIN, right=True) == "0 / 100"

    refused = admin("approve", "nobody@example.org")
    assert refused.code == ExitCode.REFUSED
    assert refused.err.strip() == "refused: no account with email 'nobody@example.org'"


def test_groups_limits_disable_enable(server: Server, admin: Admin) -> None:
    bob = signup(server, "cli-bob@example.org")
    admin.ok("approve", "cli-bob@example.org")
    out = admin.ok("groups", "cli-bob@example.org", "users", "admins")
    assert out.startswith("groups of cli-bob@example.org: admins, users")
    assert httpx.get(f"{server.url}/admin/queue", headers=bob).status_code == 200
    wizards = admin("groups", "cli-bob@example.org", "wizards")
    assert wizards.code == ExitCode.USAGE
    # The choices are the contract's groups, named in the error.
    assert "invalid choice: 'wizards' (choose from users, workers, cloud, admins)" in wizards.err
    admin.ok("groups", "cli-bob@example.org", "users")

    out = admin.ok("limits", "cli-bob@example.org", "--jobs", "3", "--bytes", "1.5GiB")
    assert out.startswith("limits of cli-bob@example.org: active jobs 3, storage 1.5 GiB\n")
    assert column_of(out.split("\n\n", 1)[1], "ACTIVE JOBS", "cli-bob@", right=True) == "0 / 3"
    out = admin.ok("limits", "cli-bob@example.org", "--jobs", "default")
    assert "active jobs 100 (the default), storage 1.5 GiB" in out
    assert admin("limits", "cli-bob@example.org").code == ExitCode.USAGE
    assert admin("limits", "cli-bob@example.org", "--bytes", "lots").code == ExitCode.USAGE
    assert admin("limits", "cli-bob@example.org", "--jobs", "-1").code == ExitCode.USAGE

    assert admin.ok("disable", "cli-bob@example.org").startswith("disabled cli-bob@example.org")
    assert httpx.get(f"{server.url}/user", headers=bob).status_code == 401
    assert admin.ok("enable", "cli-bob@example.org").startswith("enabled cli-bob@example.org")
    assert httpx.get(f"{server.url}/user", headers=bob).status_code == 200

    audit = admin.ok("audit", "--limit", "3")
    lines = audit.splitlines()
    assert lines[0].split() == ["AT", "ACTOR", "ACTION", "TARGET", "DETAILS"]
    action = lines[0].index("ACTION")
    assert [line[action:].split()[0] for line in lines[1:]] == [
        "enable_user",
        "disable_user",
        "set_limits",
    ]


def test_worker_create(server: Server, admin: Admin, tmp_path: Path) -> None:
    env_file = tmp_path / "runner.env"
    out = admin.ok("worker-create", "cli-gpu-1", "--cloud", "--env-file", str(env_file))
    assert "cli-gpu-1@" in out
    assert f"labcloud runner --env-file {env_file}" in out
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    settings = load_settings(env_file)
    assert settings.auth_url == server.url
    token = httpx.post(
        f"{settings.auth_url}/token",
        data={"username": settings.username, "password": settings.password.get_secret_value()},
    )
    assert token.status_code == 201

    # An existing file is never overwritten, and no account is created for it.
    exists = admin("worker-create", "cli-gpu-2", "--env-file", str(env_file))
    assert exists.code == ExitCode.USAGE
    assert "exists" in exists.err
    assert "cli-gpu-2" not in admin.ok("users", "--search", "cli-gpu")

    printed = admin.ok("worker-create", "cli-gpu-3")
    assert "USERNAME=cli-gpu-3@" in printed
    assert "PASSWORD=" in printed
    assert admin("worker-create", "cli-gpu-3").code == ExitCode.REFUSED


def test_queue_jobs_cancel_catalog(server: Server, admin: Admin) -> None:
    carol = signup(server, "cli-carol@example.org")
    admin.ok("approve", "cli-carol@example.org")
    upload = httpx.post(
        f"{server.url}/files/data/set/upload", files={"file": ("a.txt", b"a b")}, headers=carol
    )
    assert upload.status_code == 201
    body = {
        "job_name": "cli-job",
        "application": APP,
        "attributes": {"files_down": {"data_ids": ["set"]}},
    }
    job = httpx.post(f"{server.url}/jobs", json=body, headers=carol)
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]

    queue = admin.ok("queue")
    assert "Jobs by status" in queue
    assert "demo/latest/wordcount" in queue
    assert f"Oldest queued job: {job_id} (cli-job, cli-carol@example.org), waiting" in queue
    jobs = admin.ok("jobs", "--user", "cli-carol@example.org")
    assert column_of(jobs, "STATUS", str(job_id)) == "queued"
    assert column_of(jobs, "OWNER", str(job_id)) == "cli-carol@example.org"
    out = admin.ok("cancel", str(job_id))
    assert out == f"job {job_id} (cli-job, cli-carol@example.org) is canceled\n"
    assert admin.ok("jobs", "--user", "cli-carol@example.org", "--status", "queued") == (
        "no jobs match\n"
    )
    missing = admin("cancel", "999999")
    assert (missing.code, missing.err.strip()) == (1, "refused: job 999999 not found")
    assert admin("cancel", "seven").code == ExitCode.USAGE
    assert "cancel_job" in admin.ok("audit", "--limit", "1")

    catalog = admin.ok("catalog")
    assert f"file       {CATALOG}" in catalog
    assert "version    1" in catalog
    assert "last error none" in catalog


def test_exit_codes_and_credentials(
    server: Server, admin: Admin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LABCLOUD_ADMIN_PASSWORD", "wrong-password-1")
    wrong = admin("users")
    assert wrong.code == ExitCode.REFUSED
    assert f"login as {ADMIN} failed" in wrong.err

    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    assert admin("--password-file", str(password_file), "catalog").code == 0
    empty = tmp_path / "empty"
    empty.write_text("")
    assert admin("--password-file", str(empty), "catalog").code == ExitCode.USAGE
    missing = admin("--password-file", str(tmp_path / "nope"), "catalog")
    assert missing.code == ExitCode.USAGE
    monkeypatch.delenv("LABCLOUD_ADMIN_PASSWORD")
    no_password = admin("catalog")
    assert no_password.code == ExitCode.USAGE
    assert "LABCLOUD_ADMIN_PASSWORD" in no_password.err

    monkeypatch.setenv("LABCLOUD_ADMIN_PASSWORD", PASSWORD)
    unreachable = main(
        ["admin", "--url", f"http://127.0.0.1:{free_port()}", "--email", ADMIN, "users"]
    )
    assert unreachable == ExitCode.UNREACHABLE
    monkeypatch.delenv("LABCLOUD_URL", raising=False)
    assert main(["admin", "--email", ADMIN, "users"]) == ExitCode.USAGE
    assert admin("no-such-command").code == ExitCode.USAGE
    assert admin("--help").code == 0
    # --url and --email from the environment.
    monkeypatch.setenv("LABCLOUD_URL", server.url)
    monkeypatch.setenv("LABCLOUD_ADMIN_EMAIL", ADMIN)
    assert main(["admin", "catalog"]) == 0
    assert main(["admin", "approve", "nobody@example.org"]) == ExitCode.REFUSED


def test_table_and_sizes() -> None:
    text = table(["NAME", "N"], [["a", 1], ["long name", 1234]], numeric=1)
    assert text.splitlines() == ["NAME          N", "a             1", "long name  1234"]
    assert parse_size("100GiB") == 100 * 1024**3
    assert parse_size("1.5 GB") == 1_500_000_000
    assert parse_size("512") == 512
    assert parse_size("default") is None
    assert human_bytes(None) == "unlimited"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"


def test_json_output_is_the_servers_answer(server: Server, admin: Admin, tmp_path: Path) -> None:
    signup(server, "cli-dora@example.org")
    [dora] = json.loads(admin.ok("--json", "users", "--search", "cli-dora@"))
    assert dora["email"] == "cli-dora@example.org"
    assert dora["status"] == "pending"
    assert dora["groups"] == ["users"]
    assert json.loads(admin.ok("--json", "users", "--search", "no-such-person")) == []
    changed = json.loads(admin.ok("--json", "limits", "cli-dora@example.org", "--jobs", "7"))
    assert changed["own_limits"]["max_active_jobs"] == 7
    assert set(json.loads(admin.ok("--json", "queue"))) >= {"by_status", "oldest_queued"}
    assert json.loads(admin.ok("--json", "catalog"))["path"] == str(CATALOG)
    # With --env-file the password goes into the file only, never to the output.
    env_file = tmp_path / "dora-runner.env"
    created = json.loads(
        admin.ok("--json", "worker-create", "cli-gpu-9", "--env-file", str(env_file))
    )
    assert created == {
        "email": created["email"],
        "groups": ["workers"],
        "env_file": str(env_file),
    }
    assert created["email"].startswith("cli-gpu-9@")
    assert load_settings(env_file).password.get_secret_value() not in json.dumps(created)


def test_the_command_names_no_service_internals() -> None:
    # The CLI talks HTTP and starts services as processes: importing every module of
    # it loads none of the services' packages.
    code = (
        "import pkgutil, sys, labcloud_cli\n"
        "for module in pkgutil.walk_packages(labcloud_cli.__path__, 'labcloud_cli.'):\n"
        "    if module.name != 'labcloud_cli.__main__':\n"
        "        __import__(module.name)\n"
        "print(sorted({name.split('.')[0] for name in sys.modules}))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    for service in ("user_api", "worker_api", "worker_runner"):
        assert f"'{service}'" not in loaded
    assert "'labcloud_cli'" in loaded


def test_python_dash_m_is_the_labcloud_command() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "labcloud_cli", "admin", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert shown.startswith("usage: labcloud admin ")
    assert "worker-create" in shown


def test_where_a_job_ran() -> None:
    batch = {"runner": "cloud-1@workers", "backend": "aws-batch", "run_id": "3f2c0a9e-1b7d-4c44"}
    assert ran_on({"outcome": batch}) == "cloud-1@workers (aws-batch 3f2c0a9e-1b7)"
    assert ran_on({"outcome": {"runner": "gpu-1", "backend": "docker"}}) == "gpu-1 (docker)"
    assert ran_on({"outcome": {"failure": "canceled"}}) == ""
    assert ran_on({"outcome": None}) == ""
