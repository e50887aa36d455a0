"""Trivial jobs through the AWS Batch backend on the emulator: LabCloud's overhead
over the emulator's own submit-to-``SUCCEEDED`` time, and throughput with 50 jobs in
flight.

Starts ``labcloud up --aws-emulator --backend aws-batch`` (moto's server, Batch's
compute environment and queues, the APIs, one runner with ``BACKEND=aws-batch``) on
the test catalog, signs up a user as the example session does, and runs
``testing/1.0/noop`` (``true`` in the demo image) jobs.

1. **Overhead**, ``--jobs`` times in a row, alternating which goes first:
   - the job through LabCloud: ``POST /jobs``, then ``GET /jobs/{id}`` until it is
     ``finished``;
   - the same Batch job submitted straight to the emulator: the job definition the
     runner registered, its queue, its command (the ``/files`` prefix on a folder of
     the shared folder, then ``true``), tags of the same size; ``DescribeJobs`` until
     it is ``SUCCEEDED``.
   Both are polled every ``--poll`` seconds by the client. The overhead is the first
   minus the second, per iteration. Also printed: where a LabCloud job's time goes
   (created to leased, leased to the Batch submission, the Batch job's own time,
   its end to ``finished``).
2. **Throughput**: ``--burst`` jobs posted at once (``noop``, or ``nap`` jobs that
   sleep ``--nap`` seconds, which keep the emulator's jobs in flight long enough for
   50 to be), the runner keeping up to 50 in flight (``BATCH_MAX_IN_FLIGHT=50``),
   against the emulator alone with the same jobs kept at 50 in flight by this
   script; jobs per second from the first submission to the last end, and the most
   Batch jobs seen unfinished at once.

The emulator's own time is mostly moto's: it advances a job one state per half
second (SUBMITTED to RUNNING) and checks a running container every half second.

    poetry run python bench/batch_overhead.py [--jobs 20] [--burst 100] [--nap 0] [--poll 0.05]
                                              [--batch-poll 1]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import httpx
from _support import REPO_ROOT, ensure_image, machine_speed, percentile, summary

from labcloud_cli.stack import aws_batch
from labcloud_cli.stack.aws_emulator import REGION, STATE_FOLDER
from tests.e2e.stack import free_port
from worker_runner.backends.aws_batch.definitions import SHARED_MOUNT

CATALOG = REPO_ROOT / "tests" / "data" / "application_config.yaml"
IN_FLIGHT = 50
ACTIVE_STATES = ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING")
# The argument of the /files prefix that names the job's folder (``files_command``).
FOLDER_ARGUMENT = 4
USER = ("bench@example.org", "bench-pass-1")


@dataclass
class BatchStack:
    """A running ``labcloud up --aws-emulator --backend aws-batch``."""

    process: subprocess.Popen[bytes]
    output: Path
    data_dir: Path
    user_url: str
    emulator_url: str

    def batch(self) -> Any:
        return boto3.client(
            "batch",
            endpoint_url=self.emulator_url,
            region_name=REGION,
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        )

    @property
    def shared_dir(self) -> Path:
        return self.data_dir / STATE_FOLDER / aws_batch.SHARED_FOLDER

    def logs(self) -> str:
        parts = [self.output.read_text(errors="replace")[-3000:]]
        for path in sorted((self.data_dir / "logs").glob("*.log")):
            parts.append(f"----- {path.name} -----\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


@contextmanager
def batch_stack(poll_interval: float) -> Iterator[BatchStack]:
    """The stack, started in a temporary folder and stopped at the end."""
    labcloud = Path(sys.executable).parent / "labcloud"
    with tempfile.TemporaryDirectory(prefix="labcloud-bench-batch-") as folder:
        root = Path(folder)
        env_file = root / "stack.env"
        # No per-user limit of active jobs: the burst measures Batch, not fair use.
        env_file.write_text(
            "DEFAULT_MAX_ACTIVE_JOBS=100000000\n"
            f"BATCH_MAX_IN_FLIGHT={IN_FLIGHT}\n"
            f"BATCH_POLL_INTERVAL={poll_interval}\n"
        )
        user_port, worker_port, emulator_port = free_port(), free_port(), free_port()
        output = root / "up.log"
        with output.open("wb") as log:
            process = subprocess.Popen(
                [
                    str(labcloud),
                    "up",
                    "--aws-emulator",
                    "--backend",
                    "aws-batch",
                    "--catalog",
                    str(CATALOG),
                    "--env-file",
                    str(env_file),
                    "--data-dir",
                    str(root / "data"),
                    "--skip-demo-image",
                    "--aws-emulator-port",
                    str(emulator_port),
                    "--user-port",
                    str(user_port),
                    "--worker-port",
                    str(worker_port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        stack = BatchStack(
            process,
            output,
            root / "data",
            f"http://127.0.0.1:{user_port}",
            f"http://127.0.0.1:{emulator_port}",
        )
        try:
            deadline = time.monotonic() + 180
            while "Press Ctrl-C to stop." not in output.read_text(errors="replace"):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"labcloud up did not start:\n{stack.logs()}")
                time.sleep(0.2)
            yield stack
        except BaseException:
            print(stack.logs(), file=sys.stderr)
            raise
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _login(user_url: str) -> httpx.Client:
    email, password = USER
    created = httpx.post(f"{user_url}/user", data={"username": email, "password": password})
    created.raise_for_status()
    token = httpx.post(f"{user_url}/token", data={"username": email, "password": password})
    token.raise_for_status()
    headers = {"Authorization": f"Bearer {token.json()['id_token']}"}
    return httpx.Client(base_url=user_url, headers=headers, timeout=60)


def _post_job(client: httpx.Client, name: str, nap: float = 0) -> str:
    """Post a ``noop`` job, or with ``nap`` a ``nap`` job that sleeps that long."""
    entrypoint = "nap" if nap else "noop"
    payload = {
        "job_name": name,
        "application": {"application": "testing", "version": "1.0", "entrypoint": entrypoint},
        "attributes": {"env_vars": {"NAP_SECONDS": f"{nap:g}"}} if nap else {},
    }
    response = client.post("/jobs", json=payload)
    response.raise_for_status()
    return str(response.json()["id"])


def _wait_finished(client: httpx.Client, job_id: str, poll: float) -> dict[str, Any]:
    while True:
        job: dict[str, Any] = client.get(f"/jobs/{job_id}").json()
        if job["status"] in ("finished", "error", "canceled"):
            if job["status"] != "finished":
                raise SystemExit(f"job {job_id} ended {job['status']}: {job}")
            return job
        time.sleep(poll)


@dataclass(frozen=True)
class DirectJob:
    """What the runner submitted for a noop job, to submit the same without it."""

    definition: str
    queue: str
    command: list[str]
    environment: list[dict[str, str]]
    tags: dict[str, str]

    @classmethod
    def like(cls, described: dict[str, Any]) -> DirectJob:
        container = described["container"]
        return cls(
            definition=described["jobDefinition"],
            queue=described["jobQueue"],
            command=list(container["command"]),
            environment=[
                item
                for item in container.get("environment", [])
                if not item["name"].startswith(("MOTO_", "AWS_BATCH_"))
            ],
            tags={key: "x" * len(value) for key, value in described.get("tags", {}).items()},
        )

    def submit(self, batch: Any, name: str, shared_dir: Path) -> str:
        # A folder of its own in the shared folder, as a LabCloud job has.
        (shared_dir / name).mkdir()
        command = list(self.command)
        command[FOLDER_ARGUMENT] = f"{SHARED_MOUNT}/{name}"
        return str(
            batch.submit_job(
                jobName=name,
                jobQueue=self.queue,
                jobDefinition=self.definition,
                containerOverrides={"command": command, "environment": self.environment},
                tags=self.tags,
                propagateTags=True,
            )["jobId"]
        )


def _describe(batch: Any, job_ids: Sequence[str]) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    for first in range(0, len(job_ids), 100):
        jobs.extend(batch.describe_jobs(jobs=list(job_ids[first : first + 100]))["jobs"])
    return jobs


def _direct_run(batch: Any, job: DirectJob, name: str, shared_dir: Path, poll: float) -> float:
    began = time.perf_counter()
    job_id = job.submit(batch, name, shared_dir)
    while True:
        [described] = _describe(batch, [job_id])
        if described["status"] == "SUCCEEDED":
            return (time.perf_counter() - began) * 1000
        if described["status"] == "FAILED":
            raise SystemExit(f"the direct Batch job {job_id} FAILED: {described}")
        time.sleep(poll)


def _ms_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds() * 1000


def _epoch_ms(iso: str) -> float:
    moment = datetime.fromisoformat(iso)
    if moment.tzinfo is None:  # the APIs' dates are UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp() * 1000


class InFlightSampler:
    """The most Batch jobs unfinished at once, sampled every half second."""

    def __init__(self, batch: Any, queue: str) -> None:
        self._batch = batch
        self._queue = queue
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            count = 0
            for status in ACTIVE_STATES:
                listed = self._batch.list_jobs(jobQueue=self._queue, jobStatus=status)
                count += len(listed["jobSummaryList"])
            self.peak = max(self.peak, count)

    def __enter__(self) -> InFlightSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def _labcloud_burst(client: httpx.Client, count: int, poll: float, nap: float) -> float:
    """Seconds from the first POST to the last job finished."""
    began = time.perf_counter()
    pending = {_post_job(client, f"burst-{index}", nap) for index in range(count)}
    while pending:
        listed = client.get("/jobs", params={"limit": 1000}).json()
        for job in listed:
            if str(job["id"]) in pending and job["status"] in ("finished", "error", "canceled"):
                if job["status"] != "finished":
                    raise SystemExit(f"burst job ended {job['status']}: {job}")
                pending.discard(str(job["id"]))
        time.sleep(poll)
    return time.perf_counter() - began


def _direct_burst(batch: Any, job: DirectJob, count: int, shared_dir: Path, poll: float) -> float:
    """Seconds to run ``count`` jobs straight on the emulator, ``IN_FLIGHT`` at a time."""
    began = time.perf_counter()
    submitted = 0
    running: list[str] = []
    while submitted < count or running:
        while submitted < count and len(running) < IN_FLIGHT:
            running.append(job.submit(batch, f"direct-burst-{submitted}", shared_dir))
            submitted += 1
        states = {item["jobId"]: item["status"] for item in _describe(batch, running)}
        failed = [job_id for job_id in running if states.get(job_id) == "FAILED"]
        if failed:
            raise SystemExit(f"direct Batch jobs FAILED: {failed}")
        running = [job_id for job_id in running if states.get(job_id) != "SUCCEEDED"]
        time.sleep(poll)
    return time.perf_counter() - began


def _interleaved(
    first: bool, run_a: Callable[[], Any], run_b: Callable[[], Any]
) -> tuple[Any, Any]:
    if first:
        a = run_a()
        return a, run_b()
    b = run_b()
    return run_a(), b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20, help="measured pairs (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured pairs first")
    parser.add_argument("--burst", type=int, default=100, help="jobs of each burst (default 100)")
    parser.add_argument(
        "--nap",
        type=float,
        default=0,
        help="seconds each burst job sleeps (testing/1.0/nap); 0: noop (default)",
    )
    parser.add_argument("--poll", type=float, default=0.05, help="client poll interval, s")
    parser.add_argument(
        "--batch-poll",
        type=float,
        default=aws_batch.POLL_INTERVAL_S,
        help="the runner's BATCH_POLL_INTERVAL, s (default: what labcloud up sets)",
    )
    args = parser.parse_args()

    ensure_image()
    speed = machine_speed()
    labcloud_ms: list[float] = []
    direct_ms: list[float] = []
    overhead_ms: list[float] = []
    to_lease: list[float] = []
    lease_to_submit: list[float] = []
    in_batch: list[float] = []
    batch_end_to_finished: list[float] = []
    with batch_stack(args.batch_poll) as stack, _login(stack.user_url) as client:
        _progress(f"stack up ({stack.user_url}, emulator {stack.emulator_url})")
        batch = stack.batch()
        # The first job registers the job definition the direct jobs reuse.
        first = _wait_finished(client, _post_job(client, "first"), args.poll)
        [described] = _describe(batch, [first["outcome"]["run_id"]])
        direct = DirectJob.like(described)
        _progress("first job finished; measuring overhead")

        for index in range(args.warmup + args.jobs):

            def through_labcloud(index: int = index) -> dict[str, Any]:
                began = time.perf_counter()
                job = _wait_finished(client, _post_job(client, f"noop-{index}"), args.poll)
                job["_seen_ms"] = (time.perf_counter() - began) * 1000
                return job

            def straight(index: int = index) -> float:
                return _direct_run(batch, direct, f"direct-{index}", stack.shared_dir, args.poll)

            job, direct_run_ms = _interleaved(index % 2 == 0, through_labcloud, straight)
            _progress(f"pair {index + 1}: {job['_seen_ms']:.0f} ms / {direct_run_ms:.0f} ms")
            if index < args.warmup:
                continue
            labcloud_ms.append(job["_seen_ms"])
            direct_ms.append(direct_run_ms)
            overhead_ms.append(job["_seen_ms"] - direct_run_ms)
            [ran] = _describe(batch, [job["outcome"]["run_id"]])
            created, started, ended = job["date_created"], job["date_started"], job["date_finished"]
            to_lease.append(_ms_between(created, started))
            lease_to_submit.append(ran["createdAt"] - _epoch_ms(started))
            in_batch.append(ran["stoppedAt"] - ran["createdAt"])
            batch_end_to_finished.append(_epoch_ms(ended) - ran["stoppedAt"])

        if args.nap:
            # The burst's jobs on the emulator alone are the runner's nap job.
            nap_job = _wait_finished(client, _post_job(client, "nap", args.nap), args.poll)
            [described] = _describe(batch, [nap_job["outcome"]["run_id"]])
            direct = DirectJob.like(described)
        _progress(f"burst of {args.burst} through LabCloud")
        with InFlightSampler(batch, direct.queue) as sampler:
            labcloud_s = _labcloud_burst(client, args.burst, max(args.poll, 0.25), args.nap)
        labcloud_peak = sampler.peak
        _progress(f"burst of {args.burst} on the emulator alone")
        with InFlightSampler(batch, direct.queue) as sampler:
            direct_s = _direct_burst(batch, direct, args.burst, stack.shared_dir, args.poll)
        direct_peak = sampler.peak

    print(
        f"machine: {speed:.2f} s for the reference loop; runner BATCH_POLL_INTERVAL="
        f"{args.batch_poll:g} s, client poll {args.poll * 1000:.0f} ms"
    )
    print(f"overhead: {args.jobs} pairs in sequence after {args.warmup} warm-up, alternating")
    print(summary("emulator alone: SubmitJob to SUCCEEDED", direct_ms))
    print(summary("through LabCloud: POST /jobs to finished", labcloud_ms))
    print(summary("overhead: LabCloud - emulator, per pair", overhead_ms))
    print(summary("  LabCloud job: created -> leased", to_lease))
    print(summary("  LabCloud job: leased -> Batch job created", lease_to_submit))
    print(summary("  LabCloud job: Batch job created -> stopped", in_batch))
    print(summary("  LabCloud job: Batch job stopped -> finished", batch_end_to_finished))
    ratio = percentile(labcloud_ms, 50) / percentile(direct_ms, 50)
    print(f"p50 through LabCloud / p50 emulator alone: {ratio:.2f}")
    what = f"nap jobs of {args.nap:g} s" if args.nap else "noop jobs"
    print(f"throughput: {args.burst} {what}, at most {IN_FLIGHT} in flight")
    print(
        f"  through LabCloud   {args.burst / labcloud_s:6.2f} jobs/s  "
        f"({labcloud_s:.1f} s; at most {labcloud_peak} Batch jobs unfinished at once)"
    )
    print(
        f"  emulator alone     {args.burst / direct_s:6.2f} jobs/s  "
        f"({direct_s:.1f} s; at most {direct_peak} Batch jobs unfinished at once)"
    )


if __name__ == "__main__":
    main()
