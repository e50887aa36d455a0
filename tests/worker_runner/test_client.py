"""The worker API client against ``httpx.MockTransport`` handlers."""

from __future__ import annotations

from collections.abc import Callable
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path

import httpx
import pytest

from labcloud.contract import JobStatus, OutputKind
from worker_runner.client import AuthenticationFailed, JobGone, WorkerApiClient, WorkerApiError

API = "http://worker-api/v1"
AUTH = "http://user-api"

Handler = Callable[[httpx.Request], httpx.Response]


LOCAL_ACCESS_INFO = {
    "cognito": {"user_pool_id": None, "client_id": None, "region": None},
    "auth": "local",
}


class Recorder:
    """Answers ``/access_info`` (local auth) and the token route and delegates
    everything else, recording requests."""

    def __init__(self, handler: Handler, *, expires_in: int = 3600) -> None:
        self.handler = handler
        self.expires_in = expires_in
        self.tokens_issued = 0
        self.access_info_asked = 0
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/access_info":
            self.access_info_asked += 1
            return httpx.Response(200, json=LOCAL_ACCESS_INFO)
        if request.url.host == "user-api":
            assert request.url.path == "/token"
            form = dict(httpx.QueryParams(request.read().decode()))
            if form != {"username": "worker-1", "password": "pw"}:
                return httpx.Response(401, json={"detail": "wrong credentials"})
            self.tokens_issued += 1
            return httpx.Response(
                201, json={"id_token": f"t{self.tokens_issued}", "expires_in": self.expires_in}
            )
        self.requests.append(request)
        return self.handler(request)


def make_client(recorder: Recorder, password: str = "pw") -> WorkerApiClient:
    return WorkerApiClient(
        api_url=API,
        auth_url=AUTH,
        username="worker-1",
        password=password,
        transport=httpx.MockTransport(recorder),
        retry_delays=(0.01, 0.01),
    )


def test_token_is_fetched_once_and_sent_as_bearer() -> None:
    recorder = Recorder(lambda request: httpx.Response(200, json={}))
    with make_client(recorder) as client:
        client.pull_jobs({"memory": 1024, "cpu_cores": 2, "gpu_mem": 0})
        client.pull_jobs({"memory": 1024, "cpu_cores": 2, "gpu_mem": 0})
    assert recorder.tokens_issued == 1 and recorder.access_info_asked == 1
    assert [r.headers["authorization"] for r in recorder.requests] == ["Bearer t1"] * 2


def test_an_api_without_access_info_means_local_auth() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/access_info"):
            return httpx.Response(404, json={"detail": "Not Found"})
        return httpx.Response(200, json={})

    with WorkerApiClient(
        api_url="http://stand-in",
        auth_url=AUTH,
        username="worker-1",
        password="pw",
        transport=httpx.MockTransport(Recorder(handler)),
    ) as client:
        assert client.pull_jobs({"memory": 1}) == {}


def test_an_unreachable_access_info_is_retried_not_taken_for_local_auth() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"detail": "starting"})

    with WorkerApiClient(
        api_url="http://stand-in",
        auth_url=None,
        username="worker-1",
        password="pw",
        transport=httpx.MockTransport(handler),
    ) as client:
        with pytest.raises(WorkerApiError) as caught:
            client.authenticate()
        assert not isinstance(caught.value, AuthenticationFailed)


def test_token_is_refreshed_before_it_expires() -> None:
    recorder = Recorder(lambda request: httpx.Response(200, json={}), expires_in=0)
    with make_client(recorder) as client:
        client.pull_jobs({"memory": 1})
        client.pull_jobs({"memory": 1})
    assert recorder.tokens_issued == 2
    assert recorder.requests[1].headers["authorization"] == "Bearer t2"


def test_401_refreshes_the_token_once() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.headers["authorization"] == "Bearer t1":
            return httpx.Response(401, json={"detail": "expired"})
        return httpx.Response(204)

    recorder = Recorder(handler)
    with make_client(recorder) as client:
        client.put_status("q1", JobStatus.RUNNING)
    assert recorder.tokens_issued == 2

    always = Recorder(lambda request: httpx.Response(401, json={"detail": "no"}))
    with make_client(always) as client, pytest.raises(WorkerApiError) as caught:
        client.put_status("q1", JobStatus.RUNNING)
    assert caught.value.status_code == 401
    assert always.tokens_issued == 2


def test_wrong_credentials() -> None:
    recorder = Recorder(lambda request: httpx.Response(200, json={}))
    with make_client(recorder, password="nope") as client, pytest.raises(AuthenticationFailed):
        client.pull_jobs({"memory": 1})


def test_pull_sends_resources_and_long_poll() -> None:
    spec = {"app": {"cmd": ["x"]}}

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/jobs"
        # The read timeout outlasts the server's hold.
        assert request.extensions["timeout"]["read"] >= 20 + 1
        return httpx.Response(200, json={"q9": spec})

    recorder = Recorder(handler)
    with make_client(recorder) as client:
        jobs = client.pull_jobs(
            {"memory": 4096, "cpu_cores": 4, "gpu_mem": 8000, "gpu_model": "A10"},
            limit=1,
            wait=20,
        )
    assert jobs == {"q9": spec}
    assert dict(recorder.requests[0].url.params) == {
        "memory": "4096",
        "cpu_cores": "4",
        "gpu_mem": "8000",
        "gpu_model": "A10",
        "limit": "1",
        "wait": "20",
    }


def test_put_status_uses_query_parameters_and_404_means_gone() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/jobs/lost/status":
            return httpx.Response(404, json={"detail": "not found"})
        return httpx.Response(204)

    recorder = Recorder(handler)
    with make_client(recorder) as client:
        client.put_status("q1", JobStatus.ERROR, "exit code 1\nboom & more")
        with pytest.raises(JobGone):
            client.put_status("lost", JobStatus.RUNNING)
    first = recorder.requests[0]
    assert first.method == "PUT"
    assert first.url.path == "/v1/jobs/q1/status"
    assert dict(first.url.params) == {
        "status": "error",
        "runtime_details": "exit code 1\nboom & more",
    }
    assert first.content == b""


def test_transient_failures_are_retried() -> None:
    answers = iter([httpx.Response(503), httpx.Response(502), httpx.Response(204)])
    recorder = Recorder(lambda request: next(answers))
    with make_client(recorder) as client:
        client.put_status("q1", JobStatus.RUNNING)
    assert len(recorder.requests) == 3

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with make_client(Recorder(refuse)) as client, pytest.raises(WorkerApiError):
        client.put_status("q1", JobStatus.RUNNING)


def test_download_streams_without_token(tmp_path: Path) -> None:
    body = b"0123456789" * 300_000

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "storage":
            assert "authorization" not in request.headers
            assert request.headers["x-amz-sig"] == "abc"
            return httpx.Response(200, content=iter([body[:1000], body[1000:]]))
        assert request.url.raw_path == b"/v1/files/u%201/data/a%20b.txt/url"
        return httpx.Response(
            200,
            json={
                "method": "GET",
                "url": "http://storage/obj?sig=1",
                "headers": {"x-amz-sig": "abc"},
                "data": {},
            },
        )

    destination = tmp_path / "a b.txt"
    with make_client(Recorder(handler)) as client:
        size = client.download("u 1/data/a b.txt", destination)
    assert size == len(body)
    assert destination.read_bytes() == body
    assert list(tmp_path.iterdir()) == [destination]


def test_failed_download_leaves_nothing(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "storage":
            return httpx.Response(403, text="expired")
        return httpx.Response(
            200, json={"method": "GET", "url": "http://storage/x", "headers": {}, "data": {}}
        )

    with make_client(Recorder(handler)) as client, pytest.raises(WorkerApiError) as caught:
        client.download("u/x", tmp_path / "x")
    assert caught.value.status_code == 403
    assert list(tmp_path.iterdir()) == []


def test_download_can_be_interrupted(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "storage":
            return httpx.Response(200, content=iter([b"a", b"b", b"c"]))
        return httpx.Response(
            200, json={"method": "GET", "url": "http://storage/x", "headers": {}, "data": {}}
        )

    class Interrupted(Exception):
        pass

    def check() -> None:
        raise Interrupted

    with make_client(Recorder(handler)) as client, pytest.raises(Interrupted):
        client.download("u/x", tmp_path / "x", check=check)
    assert list(tmp_path.iterdir()) == []


def test_upload_sends_multipart_without_token(tmp_path: Path) -> None:
    source = tmp_path / "result.bin"
    source.write_bytes(b"\x00\x01" * 100_000)
    received: dict[str, bytes | str] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "storage":
            assert "authorization" not in request.headers
            assert request.method == "POST"
            head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
            message = BytesParser(policy=HTTP).parsebytes(head + request.read())
            for part in message.iter_parts():
                name = str(part.get_param("name", header="content-disposition"))
                payload = part.get_payload(decode=True)
                assert isinstance(payload, bytes)
                received[name] = payload if name == "file" else payload.decode()
                if name == "file":
                    received["filename"] = str(part.get_filename())
            return httpx.Response(204)
        assert request.url.path == "/v1/jobs/q1/files/url"
        # As DECODE's worker: base_path is the file's folder, the part names the file
        # (an S3 presigned POST for "<folder>/${filename}").
        assert dict(request.url.params) == {"type": "output", "base_path": "sub/deeper"}
        return httpx.Response(
            201,
            json={
                "method": "POST",
                "url": "http://storage/bucket",
                "headers": {},
                "data": {"key": "u/output/job/sub/deeper/${filename}", "policy": "p"},
            },
        )

    with make_client(Recorder(handler)) as client:
        client.upload("q1", OutputKind.OUTPUT, "sub/deeper/result.bin", source)
    assert received == {
        "key": "u/output/job/sub/deeper/${filename}",
        "policy": "p",
        "file": b"\x00\x01" * 100_000,
        "filename": "result.bin",
    }


def test_a_top_level_result_is_uploaded_into_the_location_itself(tmp_path: Path) -> None:
    source = tmp_path / "r.txt"
    source.write_bytes(b"r")
    asked: list[dict[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "storage":
            return httpx.Response(204)
        asked.append(dict(request.url.params))
        return httpx.Response(
            201, json={"method": "POST", "url": "http://storage/b", "headers": {}, "data": {}}
        )

    with make_client(Recorder(handler)) as client:
        client.upload("q1", OutputKind.LOG, "r.txt", source)
    assert asked == [{"type": "log", "base_path": ""}]


def test_inputs_with_the_longest_names_download(tmp_path: Path) -> None:
    # The API accepts names of up to 255 bytes; "<name>.part" would be too long.
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "storage":
            return httpx.Response(200, content=b"long")
        return httpx.Response(
            200, json={"method": "GET", "url": "http://storage/x", "headers": {}, "data": {}}
        )

    for name in ("n" * 255, "é" * 127 + "n"):
        destination = tmp_path / name
        with make_client(Recorder(handler)) as client:
            assert client.download("u/data/x", destination) == 4
        assert destination.read_bytes() == b"long"
    assert len(list(tmp_path.iterdir())) == 2


def test_relative_signed_url_is_resolved_against_the_api(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/files/u/x/url":
            return httpx.Response(
                200, json={"method": "GET", "url": "signed/x?sig=1", "headers": {}, "data": {}}
            )
        assert str(request.url) == "http://worker-api/v1/signed/x?sig=1"
        assert "authorization" not in request.headers
        return httpx.Response(200, content=b"x")

    with make_client(Recorder(handler)) as client:
        assert client.download("u/x", tmp_path / "x") == 1


def test_transfers_restart_after_a_storage_hiccup(tmp_path: Path) -> None:
    storage_answers = iter([httpx.Response(503), httpx.Response(200, content=b"data")])
    signed_urls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal signed_urls
        if request.url.host == "storage":
            return next(storage_answers)
        signed_urls += 1
        return httpx.Response(
            200, json={"method": "GET", "url": "http://storage/x", "headers": {}, "data": {}}
        )

    with make_client(Recorder(handler)) as client:
        assert client.download("u/x", tmp_path / "x") == 4
    # Each attempt asks for a fresh signed URL: the first may have expired.
    assert signed_urls == 2


def test_upload_url_404_means_gone(tmp_path: Path) -> None:
    source = tmp_path / "f"
    source.write_bytes(b"x")
    recorder = Recorder(lambda request: httpx.Response(404, json={"detail": "not found"}))
    with make_client(recorder) as client, pytest.raises(JobGone):
        client.upload("q1", OutputKind.LOG, "log.txt", source)
    assert len(recorder.requests) == 1
