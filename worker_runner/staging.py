"""The job folder: inputs staged in, results collected out.

Each leased job gets ``{PATH_BASE}/{queue_id}/`` (under the backend's job root)
holding ``files/`` (mounted at ``/files`` in the container) and ``log.txt`` (the
container's output). Every destination taken from a job spec is checked against
the folder before anything is written: no absolute paths, no ``..``, no NUL or
backslash, no symlink leading out.
Results are collected without following symlinks, so a tool cannot make the runner
upload a file from outside its folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from labcloud.contract import JobSpecs, OutputKind
from labcloud.errors import BadRequest
from labcloud.storage.paths import MAX_KEY_BYTES, normalise_path
from worker_runner import RunnerError
from worker_runner.client import JobGone, WorkerApiClient, WorkerApiError

logger = logging.getLogger(__name__)

LOG_NAME = "log.txt"
# Written into every job folder so that a cleanup removes only folders this worker
# made, even when PATH_BASE is shared or points somewhere unexpected.
MARKER_NAME = ".labcloud-worker"
TAIL_LINES = 40
TAIL_CHARS = 4000
_TAIL_READ_BYTES = 64 * 1024


class StagingError(RunnerError):
    """A job's files could not be staged."""


class UnsafePath(StagingError):
    """A path in the job spec would leave the job folder."""


class ResultsRefused(StagingError):
    """The worker API refused to keep the job's results (the owner's storage
    limit) or its log."""


class _Refused(WorkerApiError):
    """The worker API refused one result for good: its name (400) or the owner's
    storage limit (413)."""


def _is_safe_component(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def resolve_inside(base: Path, relative: str) -> Path:
    """``base / relative``, refusing anything that would land outside ``base``.

    Refused: empty or absolute paths, ``..`` parts, NUL, backslashes, and paths
    that existing symlinks under ``base`` would lead outside of it."""
    if not relative or "\0" in relative or "\\" in relative:
        raise UnsafePath(f"unsafe path {relative!r} in job spec")
    pure = PurePosixPath(relative)
    if pure.is_absolute() or ".." in pure.parts:
        raise UnsafePath(f"path {relative!r} escapes the job folder")
    candidate = base.joinpath(*pure.parts)
    if not candidate.resolve().is_relative_to(base.resolve()):
        raise UnsafePath(f"path {relative!r} escapes the job folder through a symlink")
    return candidate


@dataclass(frozen=True, slots=True)
class JobFolder:
    """Paths of one job's folder, as this process sees them (the backend maps
    ``files`` to what its runs see)."""

    root: Path

    @property
    def files(self) -> Path:
        """The folder mounted at ``/files``."""
        return self.root / "files"

    @property
    def log(self) -> Path:
        """The container's output, appended while it runs."""
        return self.root / LOG_NAME

    @classmethod
    def for_job(cls, job_root: Path, queue_id: str) -> JobFolder:
        """The folder of ``queue_id`` under ``job_root``; the id becomes a path
        component, so it is checked like one."""
        if not _is_safe_component(queue_id) or "\\" in queue_id:
            raise UnsafePath(f"queue id {queue_id!r} cannot name a folder")
        return cls(root=job_root / queue_id)

    def create(self, worker_name: str) -> None:
        """Create an empty job folder (removing one left from an earlier attempt)."""
        if self.root.exists():
            remove_tree(self.root)
        self.files.mkdir(parents=True)
        (self.root / MARKER_NAME).write_text(worker_name, encoding="utf-8")
        self.log.touch()

    def remove(self) -> None:
        """Remove the folder and everything in it."""
        remove_tree(self.root)


def remove_tree(path: Path) -> None:
    """Remove a folder tree, logging (not raising) when something stays behind."""
    if path.is_symlink():
        path.unlink()
        return
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        logger.warning("could not remove all of %s", path)


def remove_stale_folders(path_base: Path, worker_name: str) -> list[Path]:
    """Remove the job folders this worker left behind under ``path_base`` (a runner
    that starts holds no job, so all of them are stale); returns what it removed."""
    if not path_base.is_dir():
        return []
    removed = []
    for entry in sorted(path_base.iterdir()):
        marker = entry / MARKER_NAME
        if entry.is_symlink() or not entry.is_dir() or not marker.is_file():
            continue
        if marker.read_text(encoding="utf-8", errors="replace").strip() != worker_name:
            continue
        remove_tree(entry)
        removed.append(entry)
    return removed


def input_destinations(specs: JobSpecs, folder: JobFolder) -> dict[Path, str]:
    """Where each ``files_down`` entry goes, all checked before any download."""
    destinations: dict[Path, str] = {}
    for relative, uri in specs.handler.files_down.items():
        destinations[resolve_inside(folder.files, relative)] = uri
    return destinations


def output_folders(specs: JobSpecs, folder: JobFolder) -> dict[OutputKind, Path]:
    """The ``files_up`` folders, checked against the job folder."""
    return {
        kind: resolve_inside(folder.files, relative)
        for kind, relative in specs.handler.files_up.items()
    }


def stage_inputs(
    client: WorkerApiClient,
    specs: JobSpecs,
    folder: JobFolder,
    *,
    check: Callable[[], None] | None = None,
) -> int:
    """Download every input into the job folder and create the ``files_up``
    folders; returns the number of bytes downloaded. ``check`` is called between
    and during downloads and may raise to interrupt staging."""
    destinations = input_destinations(specs, folder)
    outputs = output_folders(specs, folder)
    total = 0
    for destination, uri in destinations.items():
        if check is not None:
            check()
        destination.parent.mkdir(parents=True, exist_ok=True)
        # Re-checked after creating the parents: a parent may be a symlink that an
        # earlier input's folder layout introduced.
        if not destination.resolve().is_relative_to(folder.files.resolve()):
            raise UnsafePath(f"input destination {destination} escapes the job folder")
        try:
            total += client.download(uri, destination, check=check)
        except JobGone:
            raise
        except WorkerApiError as exc:
            raise StagingError(f"download failed: {uri}: {exc.message}") from exc
        except OSError as exc:
            raise StagingError(f"download failed: {uri}: {exc}") from exc
    for path in outputs.values():
        path.mkdir(parents=True, exist_ok=True)
    return total


def upload_results(
    client: WorkerApiClient,
    queue_id: str,
    specs: JobSpecs,
    folder: JobFolder,
    *,
    check: Callable[[], None] | None = None,
) -> int:
    """Upload every result, then the log; returns how many files were stored.
    ``check`` is called before each file and may raise to interrupt the upload.

    A result whose name storage cannot take (or that the API refuses, 400) is
    skipped with a line in the log saying why: one odd name must not cost the
    others. Once the owner's storage limit refuses a result (413), the rest would
    be refused too: the log (which gets an allowance beyond the limit) is still
    uploaded, with a line saying what was not kept, and ``ResultsRefused`` says
    so. A failed upload raises ``StagingError``."""
    count = 0
    over_limit: str | None = None
    for kind, top in output_folders(specs, folder).items():
        for relative, path in iter_result_files(top):
            if check is not None:
                check()
            name = f"{kind.value}/{relative}"
            if over_limit is not None:
                note_in_log(folder.log, f"not uploaded (storage limit): {name!r}")
                continue
            problem = result_name_problem(relative)
            if problem is not None:
                note_in_log(folder.log, f"skipped result {name!r}: {problem}")
                continue
            try:
                _upload(client, queue_id, kind, relative, path)
            except _Refused as exc:
                if exc.status_code == 413:
                    over_limit = exc.message
                    note_in_log(folder.log, f"not uploaded: {name!r}: {exc.message}")
                else:
                    note_in_log(folder.log, f"skipped result {name!r}: {exc.message}")
                continue
            count += 1
    try:
        _upload(client, queue_id, OutputKind.LOG, LOG_NAME, folder.log)
    except _Refused as exc:
        raise ResultsRefused(f"the log was not kept: {exc.message}") from exc
    if over_limit is not None:
        raise ResultsRefused(f"results not all kept: {over_limit}")
    return count + 1


def _upload(
    client: WorkerApiClient, queue_id: str, kind: OutputKind, relative: str, path: Path
) -> None:
    try:
        client.upload(queue_id, kind, relative, path)
    except JobGone:
        raise
    except WorkerApiError as exc:
        if exc.status_code in (400, 413, 422):
            raise _Refused(exc.message, status_code=exc.status_code) from exc
        raise StagingError(f"upload failed: {kind.value}/{relative}: {exc.message}") from exc
    except OSError as exc:
        raise StagingError(f"upload failed: {kind.value}/{relative}: {exc}") from exc


def offer_log(client: WorkerApiClient, queue_id: str, folder: JobFolder, label: str) -> None:
    """Upload what the stopped run of an abandoned job wrote: the worker API keeps
    it when the job was cancelled with its outputs kept, and answers 404 when they
    are being discarded or the job went to another worker. Never raises."""
    if not folder.log.is_file():
        return
    try:
        client.upload(queue_id, OutputKind.LOG, LOG_NAME, folder.log)
    except JobGone:
        logger.info("%s: its log is not wanted (discarded or re-assigned)", label)
    except WorkerApiError as exc:
        logger.warning("%s: could not upload the partial log: %s", label, exc.message)
    except OSError as exc:
        logger.warning("%s: could not read the partial log: %s", label, exc)
    else:
        logger.info("%s: partial log uploaded", label)


def iter_result_files(top: Path) -> Iterator[tuple[str, Path]]:
    """``(path relative to top, absolute path)`` of the regular files under ``top``,
    sorted, never following symlinks."""
    if top.is_symlink() or not top.is_dir():
        return
    for current, dirnames, filenames in os.walk(top, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(current) / name
            try:
                mode = path.lstat().st_mode
            except OSError:
                continue
            if stat.S_ISREG(mode):
                yield path.relative_to(top).as_posix(), path


def result_name_problem(relative: str) -> str | None:
    """Why the result file at ``relative`` (its path under a ``files_up`` folder, as
    ``iter_result_files`` gives it) cannot be stored, or None. The same rules as
    every user path (``labcloud.storage.paths``): no backslash, control character,
    invalid UTF-8 or reserved name, each name at most 255 bytes and the whole path
    within the storage's limit; the API refuses such names, so uploading them
    would only fail."""
    try:
        normalise_path(relative)
    except BadRequest as exc:
        return exc.message
    if len(relative.encode("utf-8")) > MAX_KEY_BYTES:
        return f"path is too long: at most {MAX_KEY_BYTES} bytes in all"
    return None


def note_in_log(log: Path, line: str) -> None:
    """Append a line of the runner's own to the job's log (which the job's owner
    reads), marked as such."""
    with log.open("a", encoding="utf-8", errors="backslashreplace") as sink:
        sink.write(f"[labcloud] {line}\n")


def read_log_tail(path: Path, *, lines: int = TAIL_LINES, chars: int = TAIL_CHARS) -> str:
    """The last ``lines`` lines of a log file, at most ``chars`` characters."""
    try:
        with path.open("rb") as log:
            size = log.seek(0, os.SEEK_END)
            log.seek(max(0, size - _TAIL_READ_BYTES))
            data = log.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace").rstrip("\n")
    tail = "\n".join(text.splitlines()[-lines:])
    return tail[-chars:]
