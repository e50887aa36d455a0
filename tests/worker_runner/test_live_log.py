"""The runner's live log shipper against a stand-in worker API (``httpx.MockTransport``):
progress lines split across pieces, idempotent offsets, the bounds, a lost job."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import httpx
import pytest

from labcloud.contract import PROGRESS_LINE_BYTES, Progress, parse_progress
from tests.waiting import wait_for
from worker_runner.client import WorkerApiClient
from worker_runner.live_log import SKIPPED_MARKER, LiveLogShipper, ProgressParser


class LogApi:
    """Takes live log chunks like the worker API: by offset, up to ``bound`` bytes."""

    def __init__(self, *, bound: int = 1 << 30, status: int = 200) -> None:
        self.bound = bound
        self.status = status
        self.stored = bytearray()
        self.requests: list[tuple[int, int, dict[str, str]]] = []
        self.lock = threading.Lock()

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/access_info":
            return httpx.Response(200, json={"cognito": {}, "auth": "local"})
        if request.url.path == "/token":
            return httpx.Response(201, json={"id_token": "t", "expires_in": 3600})
        assert request.url.path == "/jobs/7/log"
        if self.status != 200:
            return httpx.Response(self.status, json={"detail": "no"})
        offset = int(request.url.params["offset"])
        body = request.content
        with self.lock:
            self.requests.append((offset, len(body), dict(request.url.params)))
            fresh = body[len(self.stored) - offset :]
            room = self.bound - len(self.stored)
            self.stored += fresh[:room]
            truncated = len(self.stored) >= self.bound
        return httpx.Response(
            200,
            content=json.dumps({"next_offset": offset + len(body), "truncated": truncated}),
        )


@pytest.fixture
def api() -> LogApi:
    return LogApi()


@pytest.fixture
def client(api: LogApi) -> Iterator[WorkerApiClient]:
    with WorkerApiClient(
        api_url="http://worker-api",
        auth_url="http://user-api",
        username="w@example.org",
        password="pw",
        transport=httpx.MockTransport(lambda request: api.handle(request)),
        retry_delays=(),
    ) as client:
        yield client


def test_progress_lines_parse() -> None:
    assert parse_progress(b"LABCLOUD_PROGRESS 0.42 fitting model 3\n") == Progress(
        fraction=0.42, message="fitting model 3"
    )
    assert parse_progress(b"LABCLOUD_PROGRESS - just a message") == Progress(
        fraction=None, message="just a message"
    )
    assert parse_progress(b"LABCLOUD_PROGRESS 7") == Progress(fraction=1.0)
    assert parse_progress(b"LABCLOUD_PROGRESS -3 x") == Progress(fraction=0.0, message="x")
    for line in (b"LABCLOUD_PROGRESS", b"LABCLOUD_PROGRESS half", b"progress 0.5", b"nan"):
        assert parse_progress(line) is None
    assert parse_progress(b"LABCLOUD_PROGRESS nan x") is None


def test_progress_lines_split_across_pieces_are_found() -> None:
    parser = ProgressParser()
    assert parser.feed(b"hello\nLABCLOUD_PRO") is None
    assert parser.feed(b"GRESS 0.5 half") is None  # the line is not complete yet
    assert parser.feed(b"way\nLABCLOUD_PROGRESS 0.6 a\nLABCLOUD_PROGRESS 0.7 b\n") == Progress(
        fraction=0.7, message="b"
    )
    # An over-long line is log, even when it ends like a progress line.
    assert parser.feed(b"x" * PROGRESS_LINE_BYTES) is None
    assert parser.feed(b" LABCLOUD_PROGRESS 0.9\n") is None
    assert parser.feed(b"LABCLOUD_PROGRESS 0.9\n") == Progress(fraction=0.9)


def test_output_and_progress_reach_the_api_in_order(api: LogApi, client: WorkerApiClient) -> None:
    shipper = LiveLogShipper(client, "7", interval=0.01)
    expected = b""
    for index in range(50):
        piece = f"line {index}\nLABCLOUD_PROGRESS {index / 50} step {index}\n".encode()
        shipper.feed(piece)
        expected += piece
    shipper.close(timeout=10)
    assert bytes(api.stored) == expected
    assert shipper.shipped == len(expected)
    # Offsets follow each other; the last request carried the latest progress.
    offsets = [offset for offset, _, _ in api.requests]
    assert offsets == sorted(offsets)
    with_progress = [params for _, _, params in api.requests if "progress" in params]
    assert with_progress[-1]["progress"] == "0.98"
    assert with_progress[-1]["progress_message"] == "step 49"
    assert shipper.latest_progress == Progress(fraction=0.98, message="step 49")


def test_requests_are_bounded_in_size_and_rate(api: LogApi, client: WorkerApiClient) -> None:
    shipper = LiveLogShipper(client, "7", interval=0.05, max_chunk=1000, max_pending=10_000)
    shipper.feed(b"a" * 30_000)
    shipper.close(timeout=10)
    assert all(size <= 1000 for _, size, _ in api.requests)
    # What did not fit in memory was skipped, and a marker says how much.
    assert bytes(api.stored).startswith(b"a" * 10_000)
    assert bytes(api.stored).endswith(SKIPPED_MARKER % 20_000)


def test_shipping_stops_once_the_log_reached_its_bound() -> None:
    api = LogApi(bound=5000)
    with WorkerApiClient(
        api_url="http://worker-api",
        auth_url="http://user-api",
        username="w@example.org",
        password="pw",
        transport=httpx.MockTransport(api.handle),
        retry_delays=(),
    ) as bounded:
        shipper = LiveLogShipper(bounded, "7", interval=0.01, max_chunk=4000)
        shipper.feed(b"b" * 8000)
        wait_for(lambda: len(api.requests) >= 2, timeout=10)
        count = len(api.requests)
        shipper.feed(b"c" * 8000)
        shipper.close(timeout=10)
    assert len(api.requests) == count
    assert len(api.stored) == 5000


def test_a_job_no_longer_held_stops_the_shipper() -> None:
    api = LogApi(status=404)
    with WorkerApiClient(
        api_url="http://worker-api",
        auth_url="http://user-api",
        username="w@example.org",
        password="pw",
        transport=httpx.MockTransport(api.handle),
        retry_delays=(),
    ) as gone:
        shipper = LiveLogShipper(gone, "7", interval=0.01)
        shipper.feed(b"line\n")
        shipper.close(timeout=5)
        assert shipper.shipped == 0
