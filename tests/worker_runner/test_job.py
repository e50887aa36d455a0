"""One job's phases (``worker_runner.job``): staging, the run, uploads, the final
report and its outcome, on the fake backend against the fake worker API."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import pytest

from labcloud.contract import OUTCOME_LOG_TAIL_CHARS, ContainerSpec
from tests.worker_runner.conftest import (
    IMAGE,
    WORKER,
    FakeWorkerApi,
    job_spec,
    run_one,
    running,
    wait_for,
)
from worker_runner.backends.base import BackendError, RunHandle, RunResult
from worker_runner.backends.fake import FakeBackend, FakeProgram, FakeSettings
from worker_runner.client import WorkerApiClient
from worker_runner.dispatcher import Runner, runner_identity
from worker_runner.job import LABEL_JOB_ID, LABEL_QUEUE_ID, LABEL_RUNNER, LABEL_WORKER
from worker_runner.settings import WorkerSettings


def test_happy_path(
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
    tmp_path: Path,
) -> None:
    settings.keep_job_folders = True
    api.inputs = {"u1/data/a.txt": b"A" * 3_000_000, "u1/config/c.yaml": b"k: v\n"}
    backend = FakeBackend(
        fake_settings,
        default=FakeProgram(
            log_lines=("hello from the tool",),
            files={
                "output/result.csv": b"1,2\n",
                "output/sub/x.bin": b"\x00\x01",
                "log/tool.log": b"detail\n",
            },
        ),
    )
    spec = job_spec(
        files_down={"data/a.txt": "u1/data/a.txt", "config/sub/c.yaml": "u1/config/c.yaml"},
        hardware={"memory": 2048, "cpu_cores": 2},
    )

    final = run_one(api, settings, client, backend, spec)

    assert final == ("finished", None)
    assert api.statuses_of("q1") == ["preprocessing", "running", "postprocessing", "finished"]
    files = tmp_path / "jobs" / "q1" / "files"
    assert (files / "data" / "a.txt").read_bytes() == b"A" * 3_000_000
    assert (files / "config" / "sub" / "c.yaml").read_bytes() == b"k: v\n"
    assert (files / "artifact").is_dir()
    assert not list(files.rglob("*.part"))
    [request] = backend.requests
    assert request.image == IMAGE
    assert request.command == ("/bin/sh", "-c", "run-tool --in /files/data")
    assert request.env == {"MODE": "fast"}
    assert request.folder == files
    assert (request.placement.memory, request.placement.cpus) == (2048, 2.0)
    assert (request.placement.gpus, request.placement.gpu_ids) == (0, ())
    assert request.labels == {
        LABEL_WORKER: WORKER,
        LABEL_RUNNER: runner_identity(WORKER, backend),
        LABEL_QUEUE_ID: "q1",
        LABEL_JOB_ID: "7",
    }
    # No confinement beyond the backend's defaults was asked for.
    assert request.container == ContainerSpec()
    assert request.timeout is None
    assert api.uploads_of("q1") == {
        ("output", "result.csv"): b"1,2\n",
        ("output", "sub/x.bin"): b"\x00\x01",
        ("log", "tool.log"): b"detail\n",
        ("log", "log.txt"): b"hello from the tool\n",
    }
    assert backend.removed and not backend.running()
    assert api.pull_params[0] == {
        "memory": "8192",
        "cpu_cores": "4",
        "gpus": "0",
        "gpu_mem": "0",
        "limit": "1",
    }


def test_job_folder_removed_and_keep_alive_bound_to_handling(
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
    tmp_path: Path,
) -> None:
    backend = FakeBackend(fake_settings, default=FakeProgram(duration=0.4))
    run_one(api, settings, client, backend, job_spec())

    # Keep-alives repeated the running status while the run lasted ...
    with api.lock:
        running_reports = [s for q, s, _ in api.statuses if s == "running"]
    assert len(running_reports) >= 3
    # ... and stopped with the handling: nothing follows the final status.
    with api.lock:
        count = len(api.statuses)
    time.sleep(0.3)
    with api.lock:
        assert len(api.statuses) == count
    assert api.statuses[-1][1] == "finished"
    assert not (tmp_path / "jobs" / "q1").exists()


def test_error_exit_reports_log_tail(
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
) -> None:
    lines = tuple(f"line {n}" for n in range(100))
    backend = FakeBackend(
        fake_settings,
        default=FakeProgram(exit_code=3, log_lines=lines, files={"output/partial.txt": b"p"}),
    )
    status, details = run_one(api, settings, client, backend, job_spec())

    assert status == "error"
    assert details is not None
    assert details.startswith("exit code 3\n")
    assert details.endswith("line 99")
    assert "line 60" in details and "line 59\n" not in details
    assert api.statuses_of("q1") == ["preprocessing", "running", "postprocessing", "error"]
    # Whatever the tool produced is still delivered, for debugging.
    assert ("output", "partial.txt") in api.uploads_of("q1")
    assert ("log", "log.txt") in api.uploads_of("q1")


def test_404_on_keep_alive_abandons_and_stops(
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
    tmp_path: Path,
) -> None:
    backend = FakeBackend(fake_settings, default=FakeProgram(duration=30))
    api.enqueue("q1", job_spec())
    runner = Runner(settings, client, backend)
    with running(runner):
        wait_for(lambda: backend.running())
        [handle] = backend.running()
        with api.lock:
            api.gone.add("q1")
            reported = len(api.statuses)
        wait_for(lambda: handle.id in backend.stopped, timeout=2)
        wait_for(lambda: not (tmp_path / "jobs" / "q1").exists())
        time.sleep(0.2)
    with api.lock:
        assert len(api.statuses) == reported, "nothing is reported after a 404"
    assert api.final("q1") is None
    assert handle.id in backend.removed
    assert api.uploads_of("q1") == {}


def test_cancelled_run_is_stopped_and_its_partial_log_kept(
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
    tmp_path: Path,
) -> None:
    backend = FakeBackend(
        fake_settings,
        default=FakeProgram(duration=30, log_lines=("step 1", "step 2"), files={"output/x": b"x"}),
    )
    api.enqueue("q1", job_spec())
    runner = Runner(settings, client, backend)
    with running(runner):
        wait_for(lambda: backend.running() and api.statuses_of("q1")[-1:] == ["running"])
        [handle] = backend.running()
        # Cancelled with its outputs kept: keep-alives get 404, the log is wanted.
        with api.lock:
            api.gone.add("q1")
            api.log_grace.add("q1")
        cancelled_at = time.monotonic()
        wait_for(lambda: handle.id in backend.stopped, timeout=2)
        stopped_after = time.monotonic() - cancelled_at
        wait_for(lambda: ("log", "log.txt") in api.uploads_of("q1"))
        wait_for(lambda: not (tmp_path / "jobs" / "q1").exists())
    assert stopped_after < 1
    # Only the log: the outputs of a cancelled run are not delivered.
    assert api.uploads_of("q1") == {("log", "log.txt"): b"step 1\nstep 2\n"}
    assert api.final("q1") is None
    assert handle.id in backend.removed


def test_a_failing_handler_stops_its_keep_alive_at_once(
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
) -> None:
    class ExplodingBackend(FakeBackend):
        def poll(self, handles: Sequence[RunHandle]) -> dict[str, RunResult | BackendError]:
            time.sleep(0.2)  # a few keep-alives go out first
            raise RuntimeError("the engine exploded")

    backend = ExplodingBackend(fake_settings, default=FakeProgram(duration=30))
    status, details = run_one(api, settings, client, backend, job_spec())
    assert status == "error"
    assert details is not None and details.startswith("worker error: RuntimeError: the engine")
    # The keep-alive thread ended with the handling: nothing follows the final status.
    assert not [t for t in threading.enumerate() if t.name == "keep-alive-q1"]
    with api.lock:
        count = len(api.statuses)
    time.sleep(0.3)
    with api.lock:
        assert len(api.statuses) == count
        assert api.statuses[-1][1] == "error"
    assert backend.removed


def test_timeout_stops_the_run(
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
) -> None:
    backend = FakeBackend(fake_settings, default=FakeProgram(duration=30, log_lines=("working",)))
    started = time.monotonic()
    status, details = run_one(api, settings, client, backend, job_spec(timeout=1))

    assert status == "error"
    assert details == "timed out after 1 s\nworking"
    assert time.monotonic() - started < 5
    assert backend.stopped
    assert ("log", "log.txt") in api.uploads_of("q1")


def test_oom_kill_is_reported(
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
) -> None:
    backend = FakeBackend(fake_settings, default=FakeProgram(oom_killed=True))
    status, details = run_one(api, settings, client, backend, job_spec(hardware={"memory": 512}))
    assert status == "error"
    assert details is not None
    assert details.startswith("memory limit exceeded: killed at 512 MiB")


def test_only_the_engine_says_out_of_memory(
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
) -> None:
    # A kill from outside (another stack's cleanup, `docker kill`) is said to be one.
    outside = FakeBackend(fake_settings, default=FakeProgram(outside_signal=9))
    status, details = run_one(api, settings, client, outside, job_spec(hardware={"memory": 128}))
    assert status == "error"
    assert details == (
        "killed from outside the runner: signal 9 sent through the container engine (exit code 137)"
    )

    # A SIGKILL the engine explains neither way does not blame the job's memory.
    killed = FakeBackend(fake_settings, default=FakeProgram(exit_code=137))
    status, details = run_one(
        api, settings, client, killed, job_spec(hardware={"memory": 256}), queue_id="q2"
    )
    assert status == "error"
    assert details == (
        "exit code 137: killed with SIGKILL, not by the runner; the container engine "
        "reported no out-of-memory kill"
    )
    assert "memory limit" not in details


def test_download_failure_fails_the_job(
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
) -> None:
    api.inputs = {"u1/data/ok.txt": b"ok"}
    api.broken_inputs = {"u1/data/bad.txt"}
    backend = FakeBackend(fake_settings)
    spec = job_spec(files_down={"data/ok.txt": "u1/data/ok.txt", "data/bad.txt": "u1/data/bad.txt"})
    status, details = run_one(api, settings, client, backend, spec)

    assert status == "error"
    assert details is not None
    assert details.startswith("download failed: u1/data/bad.txt")
    assert api.statuses_of("q1") == ["preprocessing", "error"]
    assert backend.requests == []


@pytest.mark.parametrize("destination", ["../evil.txt", "data/../../evil.txt", "/etc/evil"])
def test_destination_outside_job_folder_is_refused(
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
    tmp_path: Path,
    destination: str,
) -> None:
    api.inputs = {"u1/data/x": b"x"}
    backend = FakeBackend(fake_settings)
    status, details = run_one(
        api, settings, client, backend, job_spec(files_down={destination: "u1/data/x"})
    )
    assert status == "error"
    assert details is not None and "escapes the job folder" in details
    assert api.downloads == []
    assert backend.requests == []
    assert not (tmp_path / "jobs" / "evil.txt").exists()
    assert not (tmp_path / "evil.txt").exists()


def test_missing_image_fails_the_job(
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
) -> None:
    backend = FakeBackend(fake_settings, missing_images={IMAGE})
    status, details = run_one(api, settings, client, backend, job_spec())
    assert status == "error"
    assert details is not None and f"image {IMAGE} is not available" in details
    assert api.statuses_of("q1") == ["preprocessing", "running", "error"]


def test_container_confinement_comes_from_the_spec(
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
) -> None:
    backend = FakeBackend(fake_settings)
    assert run_one(api, settings, client, backend, job_spec())[0] == "finished"
    spec = job_spec(container={"pids_limit": 50, "user": f"{os.geteuid()}", "read_only_root": True})
    assert run_one(api, settings, client, backend, spec, queue_id="q2")[0] == "finished"
    default, confined = backend.requests
    # A pids_limit of None leaves the backend's default (CONTAINER_PIDS_LIMIT on Docker).
    assert (default.container.pids_limit, default.container.user) == (None, None)
    assert default.container.read_only_root is False
    assert confined.container == ContainerSpec(
        pids_limit=50, user=f"{os.geteuid()}", read_only_root=True
    )


def test_a_finished_job_reports_its_outcome(
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
) -> None:
    backend = FakeBackend(fake_settings, default=FakeProgram(duration=0.2, log_lines=("done",)))
    before = datetime.now().astimezone()
    assert run_one(api, settings, client, backend, job_spec()) == ("finished", None)
    outcome = api.outcome("q1")
    assert outcome is not None
    assert (outcome["exit_code"], outcome["log_tail"]) == (0, "done")
    assert "failure" not in outcome
    started = datetime.fromisoformat(outcome["started_at"])
    ended = datetime.fromisoformat(outcome["ended_at"])
    assert before <= started and 0.15 <= (ended - started).total_seconds() < 5
    # Only the final status carries a body; phases and keep-alives stay as they were.
    with api.lock:
        assert len(api.reports["q1"]) == 1


def test_a_failed_job_reports_its_outcome(
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
) -> None:
    lines = tuple(f"line {n} " + "x" * 200 for n in range(100))
    backend = FakeBackend(fake_settings, default=FakeProgram(exit_code=3, log_lines=lines))
    status, details = run_one(api, settings, client, backend, job_spec())
    # The query parameters are DECODE's contract: unchanged.
    assert status == "error"
    assert details is not None and details.startswith("exit code 3\n")
    outcome = api.outcome("q1")
    assert outcome is not None
    assert (outcome["exit_code"], outcome["failure"]) == (3, "user_error")
    assert outcome["started_at"] <= outcome["ended_at"]
    tail = outcome["log_tail"]
    assert len(tail) <= OUTCOME_LOG_TAIL_CHARS and tail.endswith(lines[-1])


@pytest.mark.parametrize(
    ("case", "failure", "ran"),
    [
        ("timeout", "timed_out", True),
        ("oom", "user_error", True),
        ("outside kill", "system_error", True),
        ("missing image", "system_error", False),
        ("broken storage", "system_error", False),
        ("unsafe input path", "user_error", False),
        ("invalid spec", "system_error", False),
    ],
)
def test_failure_kinds(
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
    case: str,
    failure: str,
    ran: bool,
) -> None:
    backend = FakeBackend(fake_settings, default=FakeProgram(duration=30), missing_images={"gone"})
    spec = job_spec()
    match case:
        case "timeout":
            spec = job_spec(timeout=1)
        case "oom":
            backend.default = FakeProgram(oom_killed=True)
        case "outside kill":
            backend.default = FakeProgram(outside_signal=9)
        case "missing image":
            spec = job_spec(image="gone")
        case "broken storage":
            api.broken_inputs = {"u1/in"}
            spec = job_spec(files_down={"in": "u1/in"})
        case "unsafe input path":
            spec = job_spec(files_down={"../in": "u1/in"})
        case "invalid spec":
            spec = {"app": {"cmd": "not a list"}}
    assert run_one(api, settings, client, backend, spec)[0] == "error"
    outcome = api.outcome("q1")
    assert outcome is not None and outcome["failure"] == failure
    # The times and exit code are those of a run, when there was one.
    assert ("started_at" in outcome, "ended_at" in outcome, "exit_code" in outcome) == (
        ran,
        ran,
        ran,
    )


def test_a_job_wakes_when_its_run_ends(
    api: FakeWorkerApi,
    settings: WorkerSettings,
    client: WorkerApiClient,
    fake_settings: FakeSettings,
) -> None:
    # The handler sleeps on the run's future, not in fixed steps: with a poll every
    # 10 ms, a run of 0.3 s is followed by its upload almost at once.
    settings.timeout_status = 3600
    backend = FakeBackend(fake_settings, default=FakeProgram(duration=0.3))
    api.enqueue("q1", job_spec())
    with running(Runner(settings, client, backend)):
        wait_for(lambda: api.statuses_of("q1")[-1:] == ["running"])
        started = time.monotonic()
        wait_for(lambda: "postprocessing" in api.statuses_of("q1"))
        seen = time.monotonic() - started
    assert seen < 0.3 + 0.2
    # One poll asks about every run followed; none is asked about once it ended.
    assert backend.polls and max(backend.polls) == 1
