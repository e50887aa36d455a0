"""The whole local path with real processes and the real Docker engine: sign up,
upload, start a catalog job, follow it, download its results."""

from __future__ import annotations

import contextlib
import io
import secrets
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from labcloud_cli.images import ensure_demo_image
from tests.databases import temporary_postgres_database
from tests.e2e.stack import Stack
from tests.waiting import wait_for

pytestmark = [pytest.mark.docker, pytest.mark.e2e]
CATALOG = Path(__file__).resolve().parents[1] / "data" / "application_config.yaml"
PROGRESS = ["queued", "pulled", "preprocessing", "running", "postprocessing", "finished"]


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The whole stack on SQLite, then again with both APIs on PostgreSQL."""
    ensure_demo_image(docker.from_env())
    with contextlib.ExitStack() as resources:
        databases: dict[str, str] = {}
        if request.param == "postgresql":
            admin_url = request.getfixturevalue("postgres_admin_url")
            for name in ("user_db", "queue_db"):
                databases[name] = resources.enter_context(temporary_postgres_database(admin_url))
        stack = Stack(tmp_path_factory.mktemp("stack"), CATALOG, **databases)
        try:
            stack.start(runners=1)
            yield stack
        except BaseException:
            print(stack.logs())
            raise
        finally:
            stack.stop()


def _email() -> str:
    return f"user-{secrets.token_hex(4)}@example.org"


def _job(name: str, app: str, version: str, entrypoint: str, **attributes: Any) -> dict[str, Any]:
    return {
        "job_name": name,
        "application": {"application": app, "version": version, "entrypoint": entrypoint},
        "attributes": attributes,
    }


def _follow(client: httpx.Client, job_id: int, *, until: set[str], timeout: float) -> list[str]:
    """Poll a job, returning the distinct statuses seen, in order."""
    seen: list[str] = []

    def reached() -> bool:
        status = client.get(f"/jobs/{job_id}").json()["status"]
        if not seen or seen[-1] != status:
            seen.append(status)
        return status in until

    wait_for(reached, timeout=timeout, interval=0.05, what=f"job {job_id} to reach {until}")
    return seen


def _upload(client: httpx.Client, path: str, content: bytes) -> None:
    folder, name = path.rsplit("/", 1)
    response = client.post(f"/files/{folder}/upload", files={"file": (name, content)})
    assert response.status_code == 201, response.text


def test_wordcount_end_to_end(stack: Stack) -> None:
    with stack.user(_email()) as client:
        _upload(client, "data/texts/fox.txt", b"the quick brown fox\n")
        _upload(client, "data/texts/deep/two words.txt", b"hello   world")
        _upload(client, "data/texts/empty.txt", b"")
        response = client.post(
            "/jobs",
            json=_job("count-1", "demo", "latest", "wordcount", files_down={"data_ids": ["texts"]}),
        )
        assert response.status_code == 201, response.text
        job = response.json()
        assert job["status"] == "queued"
        assert job["paths_out"] == {
            "output": "output/count-1",
            "log": "log/count-1",
            "artifact": "artifact/count-1",
        }

        seen = _follow(client, job["id"], until={"finished", "error"}, timeout=90)
        final = client.get(f"/jobs/{job['id']}").json()
        assert final["status"] == "finished", (final, stack.logs())
        # Statuses only ever move forward along the progress line.
        assert [PROGRESS.index(s) for s in seen] == sorted(PROGRESS.index(s) for s in seen)
        assert final["date_started"] and final["date_finished"]

        result = client.get("/files/output/count-1/wordcount.txt/download")
        assert result.status_code == 200
        assert result.text.splitlines() == ["deep/two words.txt 2", "empty.txt 0", "fox.txt 4"]

        archive = client.get("/files/output/count-1/download")
        assert archive.status_code == 200
        with zipfile.ZipFile(io.BytesIO(archive.content)) as zipped:
            assert zipped.read("wordcount.txt").decode() == result.text

        logs = client.get("/files/log/count-1", params={"recursive": "true"}).json()
        assert any(entry["path"].endswith("log.txt") for entry in logs)


def test_failing_entrypoint_ends_in_error_with_log_tail(stack: Stack) -> None:
    with stack.user(_email()) as client:
        response = client.post(
            "/jobs",
            json=_job("fails", "testing", "1.0", "fail", env_vars={"GREETING": "hi-there"}),
        )
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]
        _follow(client, job_id, until={"finished", "error"}, timeout=90)
        job = client.get(f"/jobs/{job_id}").json()
        assert job["status"] == "error"
        details = job["runtime_details"]
        assert "something broke" in details and "line-hi-there" in details
        assert "3" in details  # the exit code is named


def _containers(job_id: int) -> list[Any]:
    client = docker.from_env()
    return list(client.containers.list(all=True, filters={"label": f"labcloud.job_id={job_id}"}))


def test_deleting_a_running_job_stops_its_container(stack: Stack) -> None:
    with stack.user(_email()) as client:
        response = client.post("/jobs", json=_job("sleeper", "testing", "1.0", "sleep"))
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]
        _follow(client, job_id, until={"running"}, timeout=60)
        wait_for(lambda: _containers(job_id), timeout=30, what="the job's container")

        assert client.delete(f"/jobs/{job_id}").status_code == 204
        started = time.monotonic()
        wait_for(lambda: not _containers(job_id), timeout=20, what="the container to go away")
        print(f"container removed {time.monotonic() - started:.2f} s after DELETE")
        assert client.get(f"/jobs/{job_id}").status_code == 404
        assert client.get("/files/output/sleeper").status_code == 404


def test_another_user_sees_nothing(stack: Stack) -> None:
    with stack.user(_email()) as owner, stack.user(_email()) as other:
        _upload(owner, "data/private.txt", b"secret words here")
        response = owner.post(
            "/jobs",
            json=_job(
                "mine", "demo", "latest", "wordcount", files_down={"data_ids": ["private.txt"]}
            ),
        )
        job_id = response.json()["id"]
        for method, url in [
            ("GET", f"/jobs/{job_id}"),
            ("DELETE", f"/jobs/{job_id}"),
            ("POST", f"/jobs/{job_id}/cancel"),
        ]:
            assert other.request(method, url).status_code == 404
        assert all(job["id"] != job_id for job in other.get("/jobs").json())
        assert other.get("/files/data/private.txt").status_code == 404
        assert other.get("/files/data/private.txt/download").status_code == 404
        # The other user cannot use the owner's file as an input either.
        stolen = other.post(
            "/jobs",
            json=_job(
                "steal", "demo", "latest", "wordcount", files_down={"data_ids": ["private.txt"]}
            ),
        )
        assert stolen.status_code == 400
        assert owner.get(f"/jobs/{job_id}").status_code == 200
        _follow(owner, job_id, until={"finished", "error"}, timeout=90)


def test_job_submitted_while_worker_api_is_down_runs_when_it_returns(stack: Stack) -> None:
    with stack.user(_email()) as client:
        _upload(client, "data/later.txt", b"one two three")
        stack.worker_api.stop()
        try:
            response = client.post(
                "/jobs",
                json=_job(
                    "later", "demo", "latest", "wordcount", files_down={"data_ids": ["later.txt"]}
                ),
            )
            assert response.status_code == 201, response.text
            job_id = response.json()["id"]
            time.sleep(1.5)
            assert client.get(f"/jobs/{job_id}").json()["status"] == "queued"
        finally:
            stack.worker_api.start()
        _follow(client, job_id, until={"finished", "error"}, timeout=90)
        assert client.get(f"/jobs/{job_id}").json()["status"] == "finished", stack.logs()
        result = client.get("/files/output/later/wordcount.txt/download")
        assert result.text == "later.txt 3\n"
