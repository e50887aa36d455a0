"""``upload`` and ``download``: which files move where, which are already there
(same size: skipped unless forced, so a transfer that stopped half-way is restarted
by running it again), and the progress shown while they move: on a terminal a bar
per file and one for the total, otherwise one plain line per file."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from labcloud_cli.errors import LabCloudCliError, NotLoggedIn, UsageError
from labcloud_cli.output import human_bytes
from labcloud_cli.user.client import Json, UserClient

AREAS = ("config", "data", "artifact")


@dataclass(frozen=True)
class Move:
    """One file to move: ``local`` <-> ``remote`` (a path in the user's storage)."""

    local: Path
    remote: str
    size: int


@dataclass
class Report:
    """What a transfer did, file by file."""

    done: list[Move] = field(default_factory=list)
    skipped: list[Move] = field(default_factory=list)
    failed: list[tuple[Move, str]] = field(default_factory=list)

    def as_json(self) -> Json:
        def entry(move: Move) -> Json:
            return {"local": str(move.local), "remote": move.remote, "size_bytes": move.size}

        return {
            "done": [entry(m) for m in self.done],
            "skipped": [entry(m) for m in self.skipped],
            "failed": [{**entry(m), "error": error} for m, error in self.failed],
        }

    def summary(self, verb: str) -> str:
        moved = sum(m.size for m in self.done)
        text = f"{verb} {len(self.done)} file(s), {human_bytes(moved)}"
        if self.skipped:
            text += (
                f"; skipped {len(self.skipped)} already there (same size; --force sends them again)"
            )
        if self.failed:
            text += f"; {len(self.failed)} FAILED:"
            text += "".join(f"\n  {m.local} <-> {m.remote}: {error}" for m, error in self.failed)
        return text


class Bars:
    """Progress of a set of files on ``console`` (stderr)."""

    def __init__(self, console: Console, verb: str, total: int, *, quiet: bool) -> None:
        self._console = console
        self._verb = verb
        self._quiet = quiet
        self._progress: Progress | None = None
        self._total: TaskID | None = None
        if console.is_terminal and not quiet:
            self._progress = Progress(
                TextColumn("{task.description}", table_column=None),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self._total = self._progress.add_task("total", total=total or None)

    def __enter__(self) -> Bars:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    @contextmanager
    def file(self, move: Move) -> Iterator[Callable[[int], None]]:
        progress, total = self._progress, self._total
        if progress is None or total is None:
            yield lambda _count: None
            return
        task = progress.add_task(move.remote, total=move.size or None)

        def advance(count: int) -> None:
            progress.advance(task, count)
            progress.advance(total, count)

        try:
            yield advance
        finally:
            progress.remove_task(task)

    def line(self, text: str) -> None:
        """A line about one file: above the bars on a terminal, else plain."""
        if self._quiet:
            return
        self._console.print(text, markup=False, highlight=False)


def _check_area(remote: str) -> str:
    remote = remote.strip("/")
    area = remote.split("/", 1)[0]
    if area not in AREAS:
        raise UsageError(
            f"{remote!r}: uploads go under one of {', '.join(a + '/' for a in AREAS)} "
            f"(e.g. data/{PurePosixPath(remote).name or 'run1'})"
        )
    return remote


def _existing(client: UserClient, remote: str) -> dict[str, int]:
    """Sizes of the files already stored at or under ``remote``."""
    try:
        entries = client.list_files(remote, recursive=True)
    except NotLoggedIn:
        raise
    except LabCloudCliError:  # 404: nothing there yet
        return {}
    return {e["path"].rstrip("/"): e["size_bytes"] for e in entries if e["type"] == "file"}


def upload_plan(local: Path, remote: str | None) -> tuple[str, list[Move]]:
    """The files ``labcloud upload LOCAL [REMOTE]`` sends: a file to ``REMOTE``, a
    folder's files under ``REMOTE`` (a REMOTE ending in ``/`` is a folder to put
    LOCAL in, as ``REMOTE/<LOCAL's name>``); REMOTE defaults to ``data/<LOCAL's
    name>``. Also the remote path of LOCAL itself."""
    if not local.exists():
        raise UsageError(f"{local}: no such file or folder")
    name = local.resolve().name
    if remote is None:
        target = f"data/{name}"
    elif remote.endswith("/"):
        target = f"{remote.strip('/')}/{name}"
    else:
        target = remote
    target = _check_area(target)
    if local.is_file():
        return target, [Move(local, target, local.stat().st_size)]
    moves = []
    for folder, subfolders, files in os.walk(local):
        subfolders.sort()
        for file_name in sorted(files):
            path = Path(folder) / file_name
            if not path.is_file():
                continue
            relative = path.relative_to(local).as_posix()
            moves.append(Move(path, f"{target}/{relative}", path.stat().st_size))
    if not moves:
        raise UsageError(f"{local}: no files to upload")
    return target, moves


def _transfer(
    moves: list[Move],
    console: Console,
    *,
    verb: str,
    already_there: Callable[[Move], bool],
    move_one: Callable[[Move, Callable[[int], None]], object],
    shown: Callable[[Move], object],
    quiet: bool,
) -> Report:
    """Move each file not ``already_there`` with ``move_one``, a bar per file and a
    total; a file that fails is reported and the others go on (only a lost login
    stops them all)."""
    report = Report()
    todo: list[Move] = []
    for move in moves:
        (report.skipped if already_there(move) else todo).append(move)
    with Bars(console, verb, sum(m.size for m in todo), quiet=quiet) as bars:
        for move in report.skipped:
            bars.line(f"skipped {shown(move)} (already there, {human_bytes(move.size)})")
        for move in todo:
            try:
                with bars.file(move) as advance:
                    move_one(move, advance)
            except NotLoggedIn:
                raise
            except (LabCloudCliError, httpx.TransportError, OSError) as exc:
                report.failed.append((move, str(exc)))
                bars.line(f"FAILED {move.remote}: {exc}")
                continue
            report.done.append(move)
            bars.line(f"{verb}ed {shown(move)} ({human_bytes(move.size)})")
    return report


def upload(
    client: UserClient, moves: list[Move], root: str, console: Console, *, force: bool, quiet: bool
) -> Report:
    existing = {} if force else _existing(client, root)
    return _transfer(
        moves,
        console,
        verb="upload",
        already_there=lambda move: existing.get(move.remote) == move.size,
        move_one=lambda move, advance: client.upload(move.local, move.remote, advance),
        shown=lambda move: move.remote,
        quiet=quiet,
    )


def _safe_relative(path: str) -> PurePosixPath:
    relative = PurePosixPath(path)
    if relative.is_absolute() or ".." in relative.parts or "\\" in path:
        raise UsageError(f"the server named a file outside the folder: {path!r}")
    return relative


def download_plan(client: UserClient, remote: str, dest: Path | None) -> list[Move]:
    """The files of ``remote`` (a file, or a folder's files) and where they go: a
    file to DEST (or DEST/<name> if DEST is a folder), a folder's files under DEST
    (default: ./<folder name>)."""
    remote = remote.strip("/")
    entries = client.list_files(remote, recursive=True)
    files = [e for e in entries if e["type"] == "file"]
    name = PurePosixPath(remote).name
    if len(files) == 1 and files[0]["path"].rstrip("/") == remote:
        target = dest / name if dest is not None and dest.is_dir() else (dest or Path(name))
        return [Move(target, remote, files[0]["size_bytes"])]
    root = dest if dest is not None else Path(name)
    moves = []
    for entry in files:
        path = entry["path"].rstrip("/")
        if not path.startswith(remote + "/"):
            continue
        relative = _safe_relative(path[len(remote) + 1 :])
        moves.append(Move(root.joinpath(*relative.parts), path, entry["size_bytes"]))
    return moves


def download(
    client: UserClient, moves: list[Move], console: Console, *, force: bool, quiet: bool
) -> Report:
    def already_there(move: Move) -> bool:
        return not force and move.local.is_file() and move.local.stat().st_size == move.size

    return _transfer(
        moves,
        console,
        verb="download",
        already_there=already_there,
        move_one=lambda move, advance: client.download(move.remote, move.local, advance),
        shown=lambda move: move.local,
        quiet=quiet,
    )


def download_zip(
    client: UserClient, remote: str, dest: Path | None, console: Console, *, quiet: bool
) -> Report:
    """A folder as one zip archive (default: ./<folder name>.zip)."""
    remote = remote.strip("/")
    target = dest if dest is not None else Path(f"{PurePosixPath(remote).name}.zip")
    move = Move(target, remote, 0)
    report = Report()
    with Bars(console, "download", 0, quiet=quiet) as bars, bars.file(move) as advance:
        size = client.download(remote, target, advance)
    report.done.append(Move(target, remote, size))
    return report
