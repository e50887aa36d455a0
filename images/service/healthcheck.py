"""The service image's health check: exit 0 when the service in this container
answers, 1 (with the reason on stdout, which ``docker inspect`` shows) when not.

- ``user-api`` / ``worker-api``: ``GET /health`` on this container's port, which
  reaches the service's database; a service without that route is checked with
  ``GET /access_info``, which only shows that it serves HTTP.
- ``runner``: the runner has no port; it is healthy while the Docker engine and
  the worker API (``API_URL``) answer, the two things it cannot work without.

Standard library only, and one request per dependency, so that it stays cheap.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
import urllib.error
import urllib.request
from urllib.parse import urlsplit

TIMEOUT_SECONDS = 5.0
DEFAULT_PORTS = {"user-api": 8000, "worker-api": 8001}
DOCKER_SOCKET = "/var/run/docker.sock"


class Unhealthy(Exception):
    """What the service depends on does not answer."""


def _get(url: str) -> int:
    try:
        # The URL is this container's own port or the configured API_URL.
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError) as exc:
        raise Unhealthy(f"{url}: {exc}") from exc


def check_api(service: str) -> str:
    port = int(os.environ.get("LABCLOUD_PORT") or DEFAULT_PORTS[service])
    base = f"http://127.0.0.1:{port}"
    status = _get(f"{base}/health")
    if status == 404:
        status = _get(f"{base}/access_info")
    if status != 200:
        raise Unhealthy(f"{service} answered {status}")
    return f"{service} answers on port {port}"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=TIMEOUT_SECONDS)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT_SECONDS)
        self.sock.connect(self._path)


def _docker_socket() -> str:
    host = os.environ.get("DOCKER_HOST", "")
    if host.startswith("unix://"):
        return host.removeprefix("unix://")
    if host:
        raise Unhealthy(f"DOCKER_HOST={host}: only a unix socket is checked")
    return DOCKER_SOCKET


def check_runner() -> str:
    path = _docker_socket()
    connection = _UnixConnection(path)
    try:
        connection.request("GET", "/_ping")
        answer = connection.getresponse()
        if answer.status != 200:
            raise Unhealthy(f"the Docker engine at {path} answered {answer.status}")
    except OSError as exc:
        raise Unhealthy(f"the Docker engine at {path}: {exc}") from exc
    finally:
        connection.close()
    api = os.environ.get("API_URL", "").rstrip("/")
    if urlsplit(api).scheme not in ("http", "https"):
        raise Unhealthy(f"API_URL={api!r} is not an http(s) URL")
    status = _get(f"{api}/health")
    if status != 200:
        raise Unhealthy(f"the worker API at {api} answered {status}")
    return json.dumps({"docker": path, "worker_api": api})


def main() -> int:
    service = os.environ.get("LABCLOUD_SERVICE", "user-api")
    try:
        if service == "runner":
            print(check_runner())
        elif service in DEFAULT_PORTS:
            print(check_api(service))
        else:
            print(f"unknown LABCLOUD_SERVICE {service!r}")
            return 1
    except Unhealthy as exc:
        print(exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
