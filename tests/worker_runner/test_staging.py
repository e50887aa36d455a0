"""Job folders: paths checked against the folder, inputs in, results out."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from labcloud.contract import JobSpecs
from worker_runner.client import JobGone, WorkerApiClient
from worker_runner.staging import (
    MARKER_NAME,
    JobFolder,
    StagingError,
    UnsafePath,
    iter_result_files,
    read_log_tail,
    remove_stale_folders,
    resolve_inside,
    stage_inputs,
)


@pytest.mark.parametrize(
    "relative",
    ["", "../x", "a/../../x", "/etc/passwd", "a\0b", "a\\..\\x", "data/.."],
)
def test_resolve_inside_refuses_escapes(tmp_path: Path, relative: str) -> None:
    with pytest.raises(UnsafePath):
        resolve_inside(tmp_path, relative)


def test_resolve_inside_accepts_nested_paths(tmp_path: Path) -> None:
    assert resolve_inside(tmp_path, "data/sub/a.txt") == tmp_path / "data" / "sub" / "a.txt"
    assert resolve_inside(tmp_path, "./data//a.txt") == tmp_path / "data" / "a.txt"


def test_resolve_inside_refuses_symlinks_leading_out(tmp_path: Path) -> None:
    base = tmp_path / "files"
    base.mkdir()
    (base / "link").symlink_to(tmp_path)
    with pytest.raises(UnsafePath, match="symlink"):
        resolve_inside(base, "link/x")


def test_queue_id_must_be_a_plain_name(tmp_path: Path) -> None:
    folder = JobFolder.for_job(tmp_path, "abc-1")
    assert folder.files == tmp_path / "abc-1" / "files"
    assert folder.log == tmp_path / "abc-1" / "log.txt"
    for bad in ("..", "a/b", ".", "", "a\\b"):
        with pytest.raises(UnsafePath):
            JobFolder.for_job(tmp_path, bad)


def test_create_replaces_an_old_folder_and_marks_it(tmp_path: Path) -> None:
    folder = JobFolder.for_job(tmp_path, "q1")
    folder.files.mkdir(parents=True)
    (folder.files / "stale.txt").write_text("old")
    folder.create("worker-1")
    assert list(folder.files.iterdir()) == []
    assert (folder.root / MARKER_NAME).read_text() == "worker-1"
    assert folder.log.read_bytes() == b""
    folder.remove()
    assert not folder.root.exists()


def test_remove_stale_folders_only_touches_own_folders(tmp_path: Path) -> None:
    for name, owner in (("a", "w1"), ("b", "w2")):
        (tmp_path / name).mkdir()
        (tmp_path / name / MARKER_NAME).write_text(owner)
    (tmp_path / "c").mkdir()
    (tmp_path / "file.txt").write_text("x")
    assert remove_stale_folders(tmp_path, "w1") == [tmp_path / "a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "c", "file.txt"]
    assert remove_stale_folders(tmp_path / "missing", "w1") == []


def spec(files_down: dict[str, str], files_up: dict[str, str]) -> JobSpecs:
    return JobSpecs.model_validate(
        {
            "app": {"cmd": ["true"]},
            "handler": {"image_url": "img", "files_down": files_down, "files_up": files_up},
            "meta": {"job_id": 1, "date_created": "2024-01-01T00:00:00Z"},
        }
    )


def client_serving(files: dict[str, bytes], calls: list[str]) -> WorkerApiClient:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth":
            return httpx.Response(201, json={"id_token": "t", "expires_in": 3600})
        if request.url.host == "storage":
            key = request.url.path.lstrip("/")
            if key not in files:
                return httpx.Response(404, text="no such key")
            return httpx.Response(200, content=files[key])
        uri = request.url.path.removeprefix("/files/").removesuffix("/url")
        calls.append(uri)
        return httpx.Response(
            200,
            json={"method": "GET", "url": f"http://storage/{uri}", "headers": {}, "data": {}},
        )

    return WorkerApiClient(
        api_url="http://api",
        auth_url="http://auth",
        username="w",
        password="p",
        transport=httpx.MockTransport(handler),
    )


def test_stage_inputs_places_files_and_creates_output_folders(tmp_path: Path) -> None:
    folder = JobFolder.for_job(tmp_path, "q1")
    folder.create("w")
    calls: list[str] = []
    job = spec(
        {"data/a.txt": "u/data/a.txt", "data/deep/b.txt": "u/data/x/b.txt"},
        {"output": "out", "artifact": "art/nested"},
    )
    with client_serving({"u/data/a.txt": b"a", "u/data/x/b.txt": b"bb"}, calls) as client:
        assert stage_inputs(client, job, folder) == 3
    assert (folder.files / "data" / "a.txt").read_bytes() == b"a"
    assert (folder.files / "data" / "deep" / "b.txt").read_bytes() == b"bb"
    assert (folder.files / "out").is_dir()
    assert (folder.files / "art" / "nested").is_dir()


def test_stage_inputs_checks_every_path_before_downloading(tmp_path: Path) -> None:
    folder = JobFolder.for_job(tmp_path, "q1")
    folder.create("w")
    calls: list[str] = []
    job = spec({"data/a.txt": "u/a", "../b.txt": "u/b"}, {})
    with client_serving({"u/a": b"a", "u/b": b"b"}, calls) as client:
        with pytest.raises(UnsafePath):
            stage_inputs(client, job, folder)
        assert calls == []
        with pytest.raises(UnsafePath):
            stage_inputs(client, spec({}, {"output": "../../out"}), folder)


def test_stage_inputs_names_the_failing_uri(tmp_path: Path) -> None:
    folder = JobFolder.for_job(tmp_path, "q1")
    folder.create("w")
    with client_serving({}, []) as client, pytest.raises(StagingError) as caught:
        stage_inputs(client, spec({"data/a": "u/missing"}, {}), folder)
    assert caught.value.message.startswith("download failed: u/missing: ")
    assert "404" in caught.value.message
    assert not (folder.files / "data" / "a").exists()


def test_result_files_skip_symlinks_and_are_relative(tmp_path: Path) -> None:
    top = tmp_path / "out"
    (top / "sub").mkdir(parents=True)
    (top / "a.txt").write_text("a")
    (top / "sub" / "b.txt").write_text("b")
    secret = tmp_path / "secret"
    secret.write_text("host file")
    (top / "leak").symlink_to(secret)
    (top / "leakdir").symlink_to(tmp_path, target_is_directory=True)
    os.mkfifo(top / "pipe")
    assert [rel for rel, _ in iter_result_files(top)] == ["a.txt", "sub/b.txt"]
    assert list(iter_result_files(tmp_path / "absent")) == []


def test_read_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    log.write_text("".join(f"line {n}\n" for n in range(1000)))
    tail = read_log_tail(log)
    assert tail.splitlines() == [f"line {n}" for n in range(960, 1000)]
    assert len(read_log_tail(log, chars=20)) == 20
    log.write_bytes(b"x" * 10_000 + b"\xff\xfe end")
    assert read_log_tail(log).endswith("\ufffd\ufffd end")
    assert len(read_log_tail(log)) == 4000
    assert read_log_tail(tmp_path / "absent") == ""


def test_abandoning_interrupts_staging(tmp_path: Path) -> None:
    folder = JobFolder.for_job(tmp_path, "q1")
    folder.create("w")

    def gone() -> None:
        raise JobGone("taken away")

    with client_serving({"u/a": b"a"}, []) as client, pytest.raises(JobGone):
        stage_inputs(client, spec({"data/a": "u/a"}, {}), folder, check=gone)
