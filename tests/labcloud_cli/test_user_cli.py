"""The users' commands (``labcloud login``, ``upload``, ``run --wait``, ``download``...)
as a user runs them, against a real stack: both APIs and a runner with the Docker
engine, on loopback (and a user API that leaves logins to a Cognito pool on moto).
Each test logs in from a config folder of its own."""

from __future__ import annotations

import http.server
import io
import json
import secrets
import stat
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import docker
import httpx
import pytest
import yaml

from labcloud.contract import Group
from labcloud_cli.errors import ExitCode
from labcloud_cli.images import ensure_demo_image
from labcloud_cli.main import main
from labcloud_cli.user.client import UserClient
from labcloud_cli.user.credentials import Login
from labcloud_cli.user.follow import stream_log
from tests.aws import MotoServer
from tests.cognito import create_pool
from tests.e2e.stack import PASSWORD, Process, Stack, free_port, wait_ready
from tests.waiting import wait_for

pytestmark = [pytest.mark.e2e]
CATALOG = Path(__file__).resolve().parents[1] / "data" / "application_config.yaml"


# The tests' catalog and an entrypoint that reports progress and writes its log
# over a few seconds.
PROGRESSING = {
    "app": {
        "cmd": [
            "echo line-one; echo LABCLOUD_PROGRESS 0.25 warming up; sleep 4;",
            "echo LABCLOUD_PROGRESS 0.75 nearly there; sleep 4; echo line-two",
        ],
        "env": [],
    },
    "handler": {"image_url": "labcloud/demo:latest"},
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ensure_demo_image(docker.from_env())
    root = tmp_path_factory.mktemp("user-cli")
    catalog = yaml.safe_load(CATALOG.read_text())
    catalog["cli"] = {"1.0": {"progress": PROGRESSING}}
    (root / "catalog.yaml").write_text(yaml.safe_dump(catalog))
    stack = Stack(root, root / "catalog.yaml")
    try:
        stack.start(runners=1)
        yield stack
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()


@dataclass
class Result:
    code: int
    out: str
    err: str


class Cli:
    """Runs ``labcloud <args>`` in this process, as one user with their own config
    folder (``XDG_CONFIG_HOME``)."""

    def __init__(
        self,
        stack: Stack,
        config: Path,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        self.stack = stack
        self.config = config
        self.capsys = capsys
        self.monkeypatch = monkeypatch
        self.email = f"cli-{secrets.token_hex(4)}@example.org"
        monkeypatch.setenv("XDG_CONFIG_HOME", str(config))
        monkeypatch.delenv("LABCLOUD_URL", raising=False)

    def __call__(self, *args: str, stdin: str = "") -> Result:
        self.monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        self.capsys.readouterr()
        code = main(list(args))
        captured = self.capsys.readouterr()
        return Result(code, captured.out, captured.err)

    def ok(self, *args: str) -> str:
        result = self(*args)
        assert result.code == 0, (result, self.stack.logs())
        return result.out

    def sign_up_and_log_in(self) -> Result:
        created = httpx.post(
            f"{self.stack.user_url}/user", data={"username": self.email, "password": PASSWORD}
        )
        assert created.status_code == 201, created.text
        return self(
            "login",
            "--url",
            self.stack.user_url,
            "--email",
            self.email,
            "--password-stdin",
            stdin=PASSWORD + "\n",
        )

    @property
    def credentials(self) -> Path:
        return self.config / "labcloud" / "credentials.json"


@pytest.fixture
def cli(
    stack: Stack,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> Cli:
    return Cli(stack, tmp_path / "config", capsys, monkeypatch)


def _texts(root: Path) -> Path:
    folder = root / "texts"
    (folder / "deep").mkdir(parents=True)
    (folder / "fox.txt").write_text("the quick brown fox\n")
    (folder / "deep" / "two words.txt").write_text("hello   world")
    (folder / "empty.txt").write_text("")
    return folder


@pytest.mark.docker
def test_a_whole_session(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    login = cli.sign_up_and_log_in()
    assert login.code == 0, login
    assert login.out.startswith(f"logged in to {cli.stack.user_url} as {cli.email}")
    # The token is readable by its owner only, in a folder only they may enter.
    assert stat.S_IMODE(cli.credentials.stat().st_mode) == 0o600
    assert stat.S_IMODE(cli.credentials.parent.stat().st_mode) == 0o700
    saved = json.loads(cli.credentials.read_text())
    assert saved["current"] == cli.stack.user_url
    assert saved["logins"][cli.stack.user_url]["email"] == cli.email

    apps = cli.ok("apps")
    assert apps.splitlines()[0].split() == ["APPLICATION", "ENV", "INPUTS", "DESCRIPTION"]
    [wordcount] = [line for line in apps.splitlines() if line.startswith("demo/latest/wordcount")]
    assert "WORDCOUNT_PATTERN" in wordcount and "--data" in wordcount
    assert "in a confined container" in apps  # descriptions are shown
    assert "demo" in json.loads(cli.ok("apps", "--json"))

    folder = _texts(tmp_path)
    uploaded = cli.ok("upload", str(folder))
    assert "uploaded 3 file(s), 33 B" in uploaded
    # Run again, the files already there are skipped; --force sends them again.
    again = cli.ok("upload", str(folder), "data/")  # into data/, as data/texts
    assert "uploaded 0 file(s)" in again and "skipped 3 already there" in again
    (folder / "fox.txt").write_text("the quick brown fox jumps\n")
    changed = json.loads(cli.ok("upload", str(folder), "--json"))
    assert [entry["remote"] for entry in changed["done"]] == ["data/texts/fox.txt"]
    assert len(changed["skipped"]) == 2
    listing = cli.ok("ls", "data/texts", "-r")
    assert "data/texts/deep/two words.txt" in listing
    assert [e["path"] for e in json.loads(cli.ok("ls", "--json"))][:3] == [
        "artifact/",
        "config/",
        "data/",
    ]

    run = cli("run", "demo/wordcount", "--name", "count-1", "--data", "data/texts", "--wait")
    assert run.code == 0, (run, cli.stack.logs())
    assert "job " in run.out and "(count-1): finished" in run.out
    assert "results: output/count-1/" in run.out

    jobs = cli.ok("jobs")
    [row] = [line for line in jobs.splitlines() if " count-1 " in line]
    assert row.split()[2] == "finished" and "demo/latest/wordcount" in row

    log = cli.ok("logs", "count-1")
    assert "deep/two words.txt: 2 words" in log

    monkeypatch.chdir(tmp_path)
    downloaded = cli.ok("download", "--job", "count-1")
    assert "downloaded" in downloaded
    result = (tmp_path / "count-1" / "output" / "wordcount.txt").read_text()
    assert result.splitlines() == ["deep/two words.txt 2", "empty.txt 0", "fox.txt 5"]
    assert (tmp_path / "count-1" / "log").is_dir()
    again = cli.ok("download", "--job", "count-1")
    assert "downloaded 0 file(s)" in again and "skipped" in again

    cli.ok("download", "--zip", "data/texts", str(tmp_path / "texts.zip"))
    with zipfile.ZipFile(tmp_path / "texts.zip") as zipped:
        assert zipped.read("deep/two words.txt") == b"hello   world"
    cli.ok("download", "output/count-1/wordcount.txt", str(tmp_path / "one.txt"))
    assert (tmp_path / "one.txt").read_text() == result

    refused = cli("cancel", "count-1")
    assert refused.code == ExitCode.REFUSED and refused.err.startswith("refused: ")

    removed = cli.ok("rm", "count-1")
    assert removed.startswith("removed job ") and "(count-1)" in removed
    assert "count-1" not in cli.ok("jobs")
    gone = cli("logs", "count-1")
    assert gone.code == ExitCode.REFUSED
    assert "no job with id or name 'count-1'" in gone.err


@pytest.mark.docker
def test_run_wait_shows_progress_and_the_live_log(cli: Cli) -> None:
    assert cli.sign_up_and_log_in().code == 0
    run = cli("run", "cli/1.0/progress", "--name", "slow", "--wait")
    assert run.code == 0, (run, cli.stack.logs())
    # Not a terminal: the status line's changes come as plain lines on stderr, the
    # log on stdout.
    assert "(slow): running" in run.err
    assert "25% warming up" in run.err and "75% nearly there" in run.err
    assert run.out.index("line-one") < run.out.index("line-two") < run.out.index("(slow): finished")


@pytest.mark.docker
def test_logs_follow_while_the_job_runs(cli: Cli) -> None:
    assert cli.sign_up_and_log_in().code == 0
    job = json.loads(cli.ok("run", "cli/1.0/progress", "--name", "followed", "--json"))
    followed = cli("logs", "-f", "followed")
    assert followed.code == 0, followed
    assert "line-one" in followed.out and "line-two" in followed.out
    assert json.loads(cli.ok("job", "followed", "--json"))["status"] == "finished"
    # Read again after the end: the same log, from the start.
    assert cli.ok("logs", str(job["id"])) == followed.out


@pytest.mark.docker
def test_the_follower_sees_a_line_while_the_job_runs(cli: Cli) -> None:
    assert cli.sign_up_and_log_in().code == 0
    job = json.loads(cli.ok("run", "cli/1.0/progress", "--name", "live", "--json"))
    saved = json.loads(cli.credentials.read_text())["logins"][cli.stack.user_url]
    status_when_seen: list[str] = []
    with UserClient(cli.stack.user_url, timeout=10) as client:
        client.use(Login(**saved))

        def write(chunk: bytes) -> None:
            if b"line-one" in chunk and not status_when_seen:
                status_when_seen.append(client.job(job["id"])["status"])

        def ended() -> bool:
            return str(client.job(job["id"])["status"]) in ("finished", "error", "canceled")

        assert stream_log(client, job["id"], write, ended) is None
    # line-one is followed by 8 s of sleep before the job can end.
    assert status_when_seen == ["running"]


@pytest.mark.docker
def test_a_failing_job_exits_non_zero_with_its_log(cli: Cli) -> None:
    assert cli.sign_up_and_log_in().code == 0
    failed = cli("run", "testing/1.0/fail", "--name", "fails", "--env", "GREETING=hi", "--wait")
    assert failed.code == ExitCode.JOB_FAILED, failed
    assert "(fails): error" in failed.out
    assert "something broke" in failed.out  # the log's tail, from runtime_details

    as_json = cli("run", "testing/fail", "--name", "fails-2", "--wait", "--json")
    assert as_json.code == ExitCode.JOB_FAILED
    assert json.loads(as_json.out)["status"] == "error"

    bad_env = cli("run", "testing/1.0/fail", "--env", "NOT-A-PAIR")
    assert bad_env.code == ExitCode.USAGE
    assert cli("run", "nothing/here").code == ExitCode.USAGE


@pytest.mark.docker
def test_cancel_a_running_job_by_name(cli: Cli) -> None:
    assert cli.sign_up_and_log_in().code == 0
    started = json.loads(cli.ok("run", "testing/1.0/sleep", "--name", "sleeper", "--json"))
    assert started["status"] == "queued"
    canceled = cli.ok("cancel", "sleeper")
    assert f"job {started['id']} (sleeper): canceled" in canceled
    assert json.loads(cli.ok("job", str(started["id"]), "--json"))["status"] == "canceled"


@pytest.mark.docker
def test_a_queued_job_says_why_it_waits(cli: Cli) -> None:
    assert cli.sign_up_and_log_in().code == 0
    queued = json.loads(
        cli.ok("run", "testing/1.0/nap", "--name", "gpu-nap", "--gpus", "1", "--json")
    )
    assert queued["hardware"]["gpus"] == 1

    def no_gpu() -> bool:
        waiting = json.loads(cli.ok("job", "gpu-nap", "--json"))["waiting"]
        return waiting is not None and waiting["reason"] == "no_gpu"

    # The stack's runner (no GPU) is known to the worker API once it has pulled.
    wait_for(no_gpu, timeout=30, interval=0.5, what="the waiting reason no_gpu")
    shown = cli.ok("job", "gpu-nap")
    assert shown.startswith(f"job {queued['id']} (gpu-nap): queued - It needs 1 GPU")
    assert "canceled" in cli.ok("cancel", "gpu-nap")


@pytest.mark.docker
def test_login_problems_exit_with_the_login_code(cli: Cli, tmp_path: Path) -> None:
    url = cli.stack.user_url
    not_yet = cli("jobs")
    assert not_yet.code == ExitCode.NOT_LOGGED_IN
    assert "not logged in" in not_yet.err and "labcloud login" in not_yet.err
    assert cli("jobs", "--url", url).code == ExitCode.NOT_LOGGED_IN

    assert cli.sign_up_and_log_in().code == 0
    wrong = cli("login", "--url", url, "--email", cli.email, "--password-stdin", stdin="nope\n")
    assert wrong.code == ExitCode.NOT_LOGGED_IN and "refused" in wrong.err
    assert cli.ok("jobs") == "no jobs\n"  # the earlier login is kept

    # A token past its time: the command says to log in again, without asking.
    saved = json.loads(cli.credentials.read_text())
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    saved["logins"][url]["expires_at"] = past
    cli.credentials.write_text(json.dumps(saved))
    expired = cli("jobs")
    assert expired.code == ExitCode.NOT_LOGGED_IN
    assert "expired; log in again" in expired.err

    # A token the server no longer takes (here: not a token at all).
    saved["logins"][url]["expires_at"] = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    saved["logins"][url]["id_token"] = "not-a-token"
    cli.credentials.write_text(json.dumps(saved))
    refused = cli("ls")
    assert refused.code == ExitCode.NOT_LOGGED_IN and "log in again" in refused.err

    assert cli.ok("logout").startswith("logged out of ")
    assert cli("ls", "--url", url).code == ExitCode.NOT_LOGGED_IN
    unreachable = cli(
        "login", "--url", "http://127.0.0.1:9", "--email", "a@b.c", "--password-stdin", stdin="x\n"
    )
    assert unreachable.code == ExitCode.UNREACHABLE


class _NoLiveLogs(http.server.BaseHTTPRequestHandler):
    """A user API from before live logs: the route is not there."""

    def do_GET(self) -> None:
        body = b'{"detail":"Not Found"}'
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


def test_a_server_without_live_logs_is_said_so() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NoLiveLogs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with UserClient(url, timeout=5) as client:
            written: list[bytes] = []
            reason = stream_log(client, 7, written.append, lambda: True)
        assert reason == f"live logs are not available from {url}"
        assert written == []
    finally:
        server.shutdown()
        server.server_close()


def test_login_straight_at_a_cognito_pool(
    aws: MotoServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server without a token route names its pool: the client logs in there
    (boto3, pointed at moto by AWS_ENDPOINT_URL) and the server takes the token."""
    pool = create_pool(aws)
    email = "cognito-user@example.org"
    pool.add_user(email, PASSWORD, Group.USERS)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = Process(
        "user-api-cognito",
        ["user_api", "--port", str(port)],
        {
            "AUTH": "cognito",
            "COGNITO_USER_POOL_ID": pool.pool_id,
            "COGNITO_CLIENT_ID": pool.client_id,
            "COGNITO_REGION": pool.region,
            "COGNITO_JWKS_URL": pool.jwks_url,
            "INTERNAL_API_KEY_SECRET": secrets.token_urlsafe(24),
            "USER_DATA_ROOT_PATH": str(tmp_path / "data"),
            "DATABASE_URL": f"sqlite:///{tmp_path / 'user_api.db'}",
            "PUBLIC_URL": url,
            "WORKERFACING_API_URL": "http://127.0.0.1:9",
            "APPLICATION_CONFIG_FILE": str(CATALOG),
        },
        tmp_path,
    )
    server.start()
    try:
        wait_ready(url, server)
        assert httpx.get(f"{url}/access_info").json()["token_url"] is None
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))

        def labcloud(*args: str, stdin: str = "") -> tuple[int, str, str]:
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
            capsys.readouterr()
            code = main(list(args))
            captured = capsys.readouterr()
            return code, captured.out, captured.err

        login = ("login", "--url", url, "--email", email, "--password-stdin")
        code, out, err = labcloud(*login, stdin=PASSWORD + "\n")
        assert code == 0, (out, err, server.log()[-3000:])
        assert out.startswith(f"logged in to {url} as {email} (groups: users)")
        assert labcloud("jobs") == (0, "no jobs\n", "")
        code, _out, err = labcloud(*login, stdin="wrong-password-1\n")
        assert code == ExitCode.NOT_LOGGED_IN and "refused" in err
    finally:
        server.stop()
