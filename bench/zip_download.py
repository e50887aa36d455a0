"""Downloading a folder of measurement data as a zip, against downloading its files.

Starts the user API (SQLite, local storage) as a real process on 127.0.0.1, puts
``--files`` files of random bytes (``--size-mib`` in all; random bytes do not
compress, like camera frames or compressed images) into one user's folder
``data/frames/``, then, ``--rounds`` times, interleaved:

1. every file of the folder with ``GET /files/data/frames/<name>/download``,
   one after the other (what the files themselves cost);
2. the folder with ``GET /files/data/frames/download`` (a streamed zip).

Prints the rate of each (MB/s, 10^6 bytes), the zip's rate as a share of the
files', and the archive's size against the data's. The target: the zip downloads at
least half as fast as the files. With ``--verify`` the last archive is written to
a temporary file and checked with ``unzip -t``.

    poetry run python bench/zip_download.py [--size-mib 1024] [--files 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from _support import running_stack

TARGET_SHARE = 0.5
WRITE_BLOCK = 4 * 1024 * 1024


def _download(client: httpx.Client, url: str, sink: Path | None = None) -> tuple[int, float]:
    """Bytes received and seconds taken, reading the body as a client would."""
    began = time.perf_counter()
    size = 0
    with client.stream("GET", url) as response:
        response.raise_for_status()
        with sink.open("wb") if sink else open(os.devnull, "wb") as out:  # noqa: PTH123
            for chunk in response.iter_raw(1024 * 1024):
                size += len(chunk)
                out.write(chunk)
    return size, time.perf_counter() - began


def _rate(size: int, seconds: float) -> float:
    return size / seconds / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="data in all (default 1024)")
    parser.add_argument("--files", type=int, default=8, help="files in the folder (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (default 3)")
    parser.add_argument("--verify", action="store_true", help="check the last zip with unzip -t")
    args = parser.parse_args()

    with running_stack("sqlite") as stack:
        email = "zip-bench@example.org"
        client = stack.user(email)
        client.timeout = httpx.Timeout(600)
        marker = client.post(
            "/files/data/frames/upload", files={"file": ("marker.txt", b"where the folder is")}
        )
        marker.raise_for_status()
        # Written straight into the user's folder: the benchmark measures downloads,
        # not uploads. The marker found on disk tells where that folder is.
        folder = next((stack.root / "data").glob("**/data/frames/marker.txt")).parent
        (folder / "marker.txt").unlink()
        per_file = args.size_mib * 1024 * 1024 // args.files
        names = [f"frame-{index:03}.bin" for index in range(args.files)]
        for name in names:
            with (folder / name).open("wb") as out:
                for offset in range(0, per_file, WRITE_BLOCK):
                    out.write(os.urandom(min(WRITE_BLOCK, per_file - offset)))
        total = per_file * args.files
        print(f"folder: {args.files} files of random bytes, {total / 2**20:.0f} MiB in all")

        files_rates: list[float] = []
        zip_rates: list[float] = []
        archive_size = 0
        with tempfile.TemporaryDirectory(prefix="labcloud-zip-") as scratch:
            archive_path = Path(scratch) / "frames.zip"
            for round_number in range(1, args.rounds + 1):
                seconds = 0.0
                for name in names:
                    size, took = _download(client, f"/files/data/frames/{name}/download")
                    assert size == per_file, (name, size)
                    seconds += took
                files_rates.append(_rate(total, seconds))
                last = round_number == args.rounds
                sink = archive_path if args.verify and last else None
                archive_size, zip_seconds = _download(client, "/files/data/frames/download", sink)
                zip_rates.append(_rate(total, zip_seconds))
                print(
                    f"round {round_number}: files {files_rates[-1]:7.1f} MB/s ({seconds:5.2f} s), "
                    f"zip {zip_rates[-1]:7.1f} MB/s ({zip_seconds:5.2f} s)"
                )
            if args.verify:
                checked = subprocess.run(
                    ["unzip", "-tq", str(archive_path)],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                print(f"unzip -t: {checked.stdout.strip() or checked.stderr.strip()}")
        files_rate = statistics.median(files_rates)
        zip_rate = statistics.median(zip_rates)
        share = zip_rate / files_rate
        met = "met" if share >= TARGET_SHARE else "MISSED"
        print(
            f"median: files {files_rate:.1f} MB/s, zip {zip_rate:.1f} MB/s: the zip at "
            f"{share:.0%} of the files' rate (target >= {TARGET_SHARE:.0%}: {met})"
        )
        print(
            f"archive {archive_size:,} bytes for {total:,} bytes of data "
            f"({archive_size - total:+,} bytes, {archive_size / total:.4f}x)"
        )
        client.close()


if __name__ == "__main__":
    main()
