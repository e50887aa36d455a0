"""Uploading and downloading one large file through the user API, against ``cp``.

Starts the user API (SQLite) as a real process on 127.0.0.1, on local storage or,
with ``--storage s3``, on S3 served by a moto server it starts too
(``FILESYSTEM=s3``, a fresh bucket); signs up one user and gets its token as any
client would. A file of ``--size`` random bytes (default 1 GiB) is written to a
temporary folder first. Then, ``--rounds`` times, interleaved so that a change in
the machine's speed weighs on all three alike:

1. ``cp`` of the file to a new file in the same folder, then ``sync`` of the copy:
   what the disk does (the baseline; coreutils 9 copies inside the kernel with
   ``copy_file_range``, no byte passes through user space);
2. an upload: ``curl -F file=@<the file>`` to ``POST /files/data/bench/upload``,
   timed until the API answers (it answers once the file is stored and synced);
3. a download: ``curl -o <new file>`` from ``GET /files/data/bench/<name>/download``,
   then ``sync`` of the file written, as for ``cp``; and the download again to
   ``/dev/null`` (what the API sends when the client writes nothing).

The client is curl (C, as users and scripts use it), so that the client's own cost
stays out of the API's numbers. Before each step an untimed ``sync`` writes back
what the previous step left and commits the blocks it freed (on a ``discard`` mount
they are trimmed then), and the uploaded file is deleted after each round. Source
and copies are on the same file system as the API's storage. Before each transfer
the API process's peak resident memory is reset (``/proc/<pid>/clear_refs``), and
read after it (``VmHWM``).

Prints MiB/s (2^20 bytes) of each, the upload's and download's share of ``cp``,
the API process's CPU seconds and peak RSS for each, and medians (the shares are
medians of each round's ratio). The target on local storage: both at least 60 %
of ``cp``, memory flat whatever the size.

    poetry run python bench/transfer.py [--size 1GiB] [--rounds 3] [--storage local|s3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
from _procstat import cpu_seconds
from _support import machine_speed, running_stack

TARGET_SHARE = 0.6
WRITE_BLOCK = 4 * 1024 * 1024
BUCKET = "labcloud-bench"
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """``1GiB``, ``256MiB``, ``512M`` or a byte count."""
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if match is None or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1GiB, 256MiB)")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def moto_s3() -> Iterator[dict[str, str]]:
    """A moto server on loopback with an empty bucket; yields the settings that put
    the user API's storage there."""
    import boto3

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the moto server did not start") from None
                time.sleep(0.1)
        credentials = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket=BUCKET)
        yield {
            **credentials,
            "FILESYSTEM": "s3",
            "S3_BUCKET": BUCKET,
            "S3_REGION": "us-east-1",
            "S3_ENDPOINT_URL": endpoint,
        }
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def reset_peak_rss(pid: int) -> None:
    """Start a new peak for ``VmHWM`` (Linux: writing 5 to ``clear_refs``)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def write_random(path: Path, size: int) -> None:
    with path.open("wb") as out:
        for offset in range(0, size, WRITE_BLOCK):
            out.write(os.urandom(min(WRITE_BLOCK, size - offset)))


def _run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({done.returncode}): {done.stderr or done.stdout}")
    return done.stdout


def settle() -> None:
    """Untimed: write back what the last step left dirty, and let the file system
    commit the blocks it freed (``discard`` mounts trim them then), so that no step
    pays for the one before it."""
    _run(["sync"])


def timed_cp(source: Path, target: Path) -> float:
    began = time.perf_counter()
    _run(["cp", str(source), str(target)])
    _run(["sync", str(target)])
    return time.perf_counter() - began


def timed_upload(url: str, token: str, source: Path) -> float:
    began = time.perf_counter()
    output = _run(
        [
            "curl",
            "--silent",
            "--show-error",
            "--fail-with-body",
            # No "Expect: 100-continue" round trip: the body follows the headers.
            "-H",
            "Expect:",
            "-H",
            f"Authorization: Bearer {token}",
            "-F",
            f"file=@{source};type=application/octet-stream",
            url,
        ]
    )
    took = time.perf_counter() - began
    assert '"size_bytes"' in output, output
    return took


def timed_download(url: str, token: str, target: Path) -> float:
    began = time.perf_counter()
    _run(
        [
            "curl",
            "--silent",
            "--show-error",
            "--fail",
            "-H",
            f"Authorization: Bearer {token}",
            "-o",
            str(target),
            url,
        ]
    )
    _run(["sync", str(target)])
    return time.perf_counter() - began


def timed_download_discarded(url: str, token: str) -> float:
    """The download with nothing written on the client's side: what the API sends."""
    began = time.perf_counter()
    auth = f"Authorization: Bearer {token}"
    _run(["curl", "--silent", "--show-error", "--fail", "-H", auth, "-o", os.devnull, url])
    return time.perf_counter() - began


def _rate(size: int, seconds: float) -> float:
    return size / seconds / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=2**30, help="default 1GiB")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (default 3)")
    parser.add_argument("--storage", choices=("local", "s3"), default="local")
    args = parser.parse_args()
    size: int = args.size

    print(f"machine: fixed loop in {machine_speed():.2f} s (lower is faster)")
    with contextlib.ExitStack() as resources:
        user_env = resources.enter_context(moto_s3()) if args.storage == "s3" else {}
        stack = resources.enter_context(running_stack("sqlite", user_env=user_env))
        scratch = Path(resources.enter_context(tempfile.TemporaryDirectory(prefix="lc-xfer-")))
        client = stack.user("transfer-bench@example.org")
        token = client.headers["Authorization"].removeprefix("Bearer ")
        client.close()
        pid = stack.user_api.pid
        source = scratch / "sample.bin"
        write_random(source, size)
        _run(["sync"])  # the source on disk before anything is timed
        upload_url = f"{stack.user_url}/files/data/bench/upload"
        download_url = f"{stack.user_url}/files/data/bench/{source.name}/download"
        print(
            f"storage: {args.storage}; file: {size / 2**20:.0f} MiB of random bytes; "
            f"API process {pid}, RSS {rss_mib(pid):.0f} MiB after start"
        )

        cp_rates: list[float] = []
        sent_rates: list[float] = []
        up_rates: list[float] = []
        down_rates: list[float] = []
        up_peaks: list[float] = []
        down_peaks: list[float] = []
        up_cpu: list[float] = []
        down_cpu: list[float] = []
        for round_number in range(1, args.rounds + 1):
            copy = scratch / "copy.bin"
            settle()
            cp_rates.append(_rate(size, timed_cp(source, copy)))
            copy.unlink()

            settle()
            reset_peak_rss(pid)
            cpu_before = cpu_seconds(pid)
            up_rates.append(_rate(size, timed_upload(upload_url, token, source)))
            up_cpu.append(cpu_seconds(pid) - cpu_before)
            up_peaks.append(peak_rss_mib(pid))

            settle()
            reset_peak_rss(pid)
            cpu_before = cpu_seconds(pid)
            down_rates.append(_rate(size, timed_download(download_url, token, copy)))
            down_cpu.append(cpu_seconds(pid) - cpu_before)
            down_peaks.append(peak_rss_mib(pid))
            assert copy.stat().st_size == size, copy.stat().st_size
            copy.unlink()
            settle()
            sent_rates.append(_rate(size, timed_download_discarded(download_url, token)))
            # The next upload writes a new file, as this one did.
            deleted = httpx.delete(
                f"{stack.user_url}/files/data/bench/{source.name}",
                headers={"Authorization": f"Bearer {token}"},
            )
            assert deleted.status_code == 204, deleted.text
            print(
                f"round {round_number}: cp+sync {cp_rates[-1]:6.0f} MiB/s | "
                f"upload {up_rates[-1]:7.1f} MiB/s ({up_rates[-1] / cp_rates[-1]:4.0%} of cp), "
                f"API CPU {up_cpu[-1]:4.1f} s, peak RSS {up_peaks[-1]:4.0f} MiB | "
                f"download {down_rates[-1]:7.1f} MiB/s ({down_rates[-1] / cp_rates[-1]:4.0%}), "
                f"API CPU {down_cpu[-1]:4.1f} s, peak RSS {down_peaks[-1]:4.0f} MiB; "
                f"to /dev/null {sent_rates[-1]:6.0f} MiB/s"
            )

        cp_rate = statistics.median(cp_rates)
        up_share = statistics.median(u / c for u, c in zip(up_rates, cp_rates, strict=True))
        down_share = statistics.median(d / c for d, c in zip(down_rates, cp_rates, strict=True))
        print(
            f"median over {args.rounds} round(s): cp+sync {cp_rate:.1f} MiB/s; "
            f"upload {statistics.median(up_rates):.1f} MiB/s = {up_share:.0%} of cp, "
            f"API CPU {statistics.median(up_cpu):.1f} s, peak RSS {max(up_peaks):.0f} MiB; "
            f"download {statistics.median(down_rates):.1f} MiB/s = {down_share:.0%} of cp, "
            f"API CPU {statistics.median(down_cpu):.1f} s, peak RSS {max(down_peaks):.0f} MiB"
        )
        sent = statistics.median(sent_rates)
        print(
            f"  the API sends {sent:.1f} MiB/s to a client that writes nothing "
            f"({statistics.median(s / c for s, c in zip(sent_rates, cp_rates, strict=True)):.0%}"
            " of cp)"
        )
        if args.storage == "local":
            met = min(up_share, down_share) >= TARGET_SHARE
            print(f"target >= {TARGET_SHARE:.0%} of cp for both: {'met' if met else 'MISSED'}")


if __name__ == "__main__":
    main()
