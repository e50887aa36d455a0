"""The files service, and the redemption of signed URLs, on a real local storage
folder (no HTTP)."""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from labcloud.db import create_db_engine, make_session_factory, migrate
from labcloud.errors import BadRequest, Conflict, MethodNotAllowed, NotFound
from labcloud.storage.base import EntryType
from labcloud.storage.local import LocalStorage
from labcloud.storage.paths import UnknownArea, UnsafePath
from labcloud.storage.quota import StorageLimitReached
from labcloud.storage.signing import (
    Audience,
    SignedUrlInvalid,
    SignedUrlOwnerInactive,
    SignedUrlUsed,
    UrlSigner,
)
from labcloud.storage.transfers import LocalTransfers, UploadTooLarge
from labcloud.storage.uploads import IncomingFile
from user_api.app import MIGRATIONS
from user_api.files import service, signed
from user_api.files.schemas import FileInfo, UploadedFiles
from user_api.limits import OwnerState

SUBJECT = "u1"
BASE_URL = "http://127.0.0.1:8000"
AREAS = ["artifact/", "config/", "data/", "log/", "output/"]


class Clock:
    now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def storage(tmp_path: Path, clock: Clock) -> LocalStorage:
    """A local storage that signs URLs for the user API at ``BASE_URL``."""
    (tmp_path / "data").mkdir()
    signer = UrlSigner(b"s" * 32, clock=clock)
    transfers = LocalTransfers(signer, base_url=BASE_URL, audience=Audience.USER_API)
    return LocalStorage(tmp_path / "data", transfers=transfers)


@pytest.fixture
def clock() -> Clock:
    # The real time to start with: used upload URLs are forgotten once expired by
    # the database's clock.
    clock = Clock()
    clock.now = time.time()
    return clock


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    """The user API's database, built by its migrations (for used upload URLs)."""
    engine = create_db_engine(database_url)
    migrate(engine, MIGRATIONS)
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()


class Owners:
    """The state of accounts, as the files routes read it from the accounts table."""

    def __init__(self) -> None:
        self.states: dict[str, OwnerState] = {}

    def __call__(self, subject: str) -> OwnerState:
        return self.states.get(subject, OwnerState(active=True, max_storage_bytes=None))


def signed_upload(
    storage: LocalStorage,
    token: str,
    sessions: sessionmaker[Session],
    *files: tuple[str | None, bytes],
    owners: Owners | None = None,
) -> UploadedFiles:
    return signed.signed_upload(
        storage,
        token,
        [IncomingFile(name, io.BytesIO(data)) for name, data in files],
        owner_of=owners or Owners(),
        session_factory=sessions,
        job_named=no_jobs,
    )


def upload(storage: LocalStorage, area: str, folder: str, name: str, data: bytes) -> FileInfo:
    return service.upload_file(
        storage,
        SUBJECT,
        area,
        folder,
        filename=name,
        stream=io.BytesIO(data),
        job_named=no_jobs,
    )


def no_jobs(subject: str, name: str) -> bool:
    return False


def paths(infos: list[FileInfo]) -> list[str]:
    return [info.path for info in infos]


def files_on_disk(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def token_of(url: str) -> str:
    assert url.startswith(f"{BASE_URL}/_signed/")
    return url.rsplit("/", 1)[1]


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 Bytes"),
        (1, "1 Byte"),
        (999, "999 Bytes"),
        (1000, "1.0 kB"),
        (1234, "1.2 kB"),
        (999_999, "1000.0 kB"),
        (3_400_000, "3.4 MB"),
        (5 * 10**12, "5.0 TB"),
        (10**33, "1000.0 QB"),
    ],
)
def test_natural_size_matches_upstream(size: int, text: str) -> None:
    assert service.natural_size(size) == text


def test_root_lists_the_areas(storage: LocalStorage) -> None:
    for root in ("", "/"):
        infos = service.list_files(storage, SUBJECT, root)
        assert paths(infos) == AREAS
        assert infos[0] == FileInfo(
            path="artifact/", type=EntryType.DIRECTORY, size="", size_bytes=0
        )
    assert service.list_files(storage, SUBJECT, "", show_dirs=False) == []
    # Reading writes nothing.
    assert files_on_disk(storage.root) == []


def test_upload_and_list(storage: LocalStorage) -> None:
    info = upload(storage, "data", "test/", "data_file1.txt", b"data file1 contents")
    assert info == FileInfo(
        path="data/test/data_file1.txt", type=EntryType.FILE, size="19 Bytes", size_bytes=19
    )
    upload(storage, "config", "", "c.yaml", b"a: 1")
    everything = service.list_files(storage, SUBJECT, "/", recursive=True)
    assert paths(everything) == [
        "artifact/",
        "config/",
        "config/c.yaml",
        "data/",
        "data/test/",
        "data/test/data_file1.txt",
        "log/",
        "output/",
    ]
    files_only = service.list_files(storage, SUBJECT, "", recursive=True, show_dirs=False)
    assert paths(files_only) == ["config/c.yaml", "data/test/data_file1.txt"]
    assert paths(service.list_files(storage, SUBJECT, "data")) == ["data/test/"]
    assert paths(service.list_files(storage, SUBJECT, "data/test/")) == ["data/test/data_file1.txt"]
    # Listing a file gives the file.
    assert service.list_files(storage, SUBJECT, "data/test/data_file1.txt") == [info]
    # Areas exist before anything was stored in them.
    assert service.list_files(storage, SUBJECT, "artifact") == []


def test_listing_something_absent_is_404(storage: LocalStorage) -> None:
    with pytest.raises(NotFound, match=re.escape("no file or folder at 'data/none'")):
        service.list_files(storage, SUBJECT, "data/none")
    with pytest.raises(UnknownArea):
        service.list_files(storage, SUBJECT, "does_not_exist")


def test_users_only_reach_their_own_root(storage: LocalStorage) -> None:
    upload(storage, "data", "", "mine.txt", b"u1")
    service.upload_file(
        storage,
        "u2",
        "data",
        "",
        filename="theirs.txt",
        stream=io.BytesIO(b"u2"),
        job_named=no_jobs,
    )
    assert paths(service.list_files(storage, SUBJECT, "data")) == ["data/mine.txt"]
    with pytest.raises(UnsafePath):
        service.list_files(storage, SUBJECT, "data/../../u2/data")


@pytest.mark.parametrize(
    ("area", "folder", "name", "error", "message"),
    [
        ("output", "x", "a.txt", UnknownArea, "use one of config, data, artifact"),
        ("log", "", "a.txt", UnknownArea, "use one of config, data, artifact"),
        ("secrets", "", "a.txt", UnknownArea, "unknown area 'secrets'"),
        ("data", "../output", "a.txt", UnsafePath, "'..' segment"),
        ("data", "x", "../../a.txt", UnsafePath, "'..' segment"),
        ("data", "x", "a\\b.txt", UnsafePath, "backslash"),
        ("data", "x", "%2e%2e", UnsafePath, "percent-decoded contains a '..' segment"),
        ("data", "x", "a\x00.txt", UnsafePath, "NUL"),
        ("data", "x", "", BadRequest, "has no file name"),
    ],
)
def test_bad_uploads_write_nothing(
    storage: LocalStorage,
    area: str,
    folder: str,
    name: str,
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error) as caught:
        upload(storage, area, folder, name, b"payload")
    assert message in str(caught.value)
    assert isinstance(caught.value, BadRequest)
    assert files_on_disk(storage.root) == []


def test_upload_conflicts(storage: LocalStorage) -> None:
    service.make_folder(storage, SUBJECT, "data", "run1/sub", job_named=no_jobs)
    with pytest.raises(Conflict, match=re.escape("'data/run1/sub/' is a folder")):
        upload(storage, "data", "run1", "sub", b"x")
    upload(storage, "data", "", "plain.txt", b"x")
    with pytest.raises(Conflict, match=re.escape("'data/plain.txt' is a file, not a folder")):
        upload(storage, "data", "plain.txt/deeper", "a.txt", b"x")
    # Replacing a file is allowed.
    assert upload(storage, "data", "", "plain.txt", b"longer").size_bytes == 6


def test_make_folder(storage: LocalStorage) -> None:
    info = service.make_folder(storage, SUBJECT, "data", "new/nested/", job_named=no_jobs)
    assert info == FileInfo(
        path="data/new/nested/", type=EntryType.DIRECTORY, size="", size_bytes=0
    )
    assert service.make_folder(storage, SUBJECT, "data", "new/nested", job_named=no_jobs) == info
    upload(storage, "data", "", "f", b"x")
    with pytest.raises(Conflict, match=re.escape("'data/f' is a file, not a folder")):
        service.make_folder(storage, SUBJECT, "data", "f", job_named=no_jobs)
    with pytest.raises(UnknownArea, match="config, data, artifact"):
        service.make_folder(storage, SUBJECT, "output", "x", job_named=no_jobs)


def test_rename_file(storage: LocalStorage) -> None:
    upload(storage, "data", "test", "one.txt", b"one")
    upload(storage, "data", "test", "two.txt", b"two")
    renamed = service.rename(
        storage, SUBJECT, "data/test/one.txt", "artifact/moved/one.txt", job_named=no_jobs
    )
    assert renamed == FileInfo(
        path="artifact/moved/one.txt", type=EntryType.FILE, size="3 Bytes", size_bytes=3
    )
    assert paths(service.list_files(storage, SUBJECT, "data/test")) == ["data/test/two.txt"]
    # Renaming onto itself changes nothing.
    assert service.rename(
        storage, SUBJECT, "data/test/two.txt", "data/test//two.txt", job_named=no_jobs
    ).path == ("data/test/two.txt")


def test_rename_refusals(storage: LocalStorage) -> None:
    upload(storage, "data", "test", "one.txt", b"one")
    upload(storage, "data", "test", "two.txt", b"two")
    storage.write("u1/output/job/result.txt", io.BytesIO(b"r"))  # as a job's result
    service.make_folder(storage, SUBJECT, "data", "empty", job_named=no_jobs)
    with pytest.raises(NotFound, match=re.escape("'data/none.txt'")):
        service.rename(storage, SUBJECT, "data/none.txt", "data/x.txt", job_named=no_jobs)
    with pytest.raises(MethodNotAllowed, match=re.escape("area folder 'data/'")):
        service.rename(storage, SUBJECT, "data/", "/data/new", job_named=no_jobs)
    with pytest.raises(MethodNotAllowed, match="root folder"):
        service.rename(storage, SUBJECT, "/", "data/new", job_named=no_jobs)
    with pytest.raises(MethodNotAllowed, match=re.escape("'data/test/' is not empty")):
        service.rename(storage, SUBJECT, "data/test", "data/other", job_named=no_jobs)
    with pytest.raises(Conflict, match=re.escape("'data/test/two.txt' already exists")):
        service.rename(
            storage, SUBJECT, "data/test/one.txt", "data/test/two.txt", job_named=no_jobs
        )
    with pytest.raises(Conflict, match=re.escape("'config/' already exists")):
        service.rename(storage, SUBJECT, "data/test/one.txt", "config", job_named=no_jobs)
    with pytest.raises(UnknownArea, match="use one of config, data, artifact"):
        service.rename(storage, SUBJECT, "data/test/one.txt", "output/one.txt", job_named=no_jobs)
    with pytest.raises(UnsafePath, match="is absolute"):
        service.rename(storage, SUBJECT, "data/test/one.txt", "/data/abs.txt", job_named=no_jobs)
    with pytest.raises(UnsafePath, match=re.escape("'..' segment")):
        service.rename(
            storage, SUBJECT, "data/test/one.txt", "data/../../u2/data/x", job_named=no_jobs
        )
    with pytest.raises(BadRequest, match="into itself"):
        service.rename(storage, SUBJECT, "data/empty", "data/empty/inner", job_named=no_jobs)
    with pytest.raises(Conflict, match=re.escape("'data/test/one.txt' is a file, not a folder")):
        service.rename(
            storage, SUBJECT, "data/test/two.txt", "data/test/one.txt/two.txt", job_named=no_jobs
        )
    before = files_on_disk(storage.root)
    assert "u1/data/test/one.txt" in before
    # An empty folder moves; a job's result may be kept as an artifact.
    assert (
        service.rename(storage, SUBJECT, "data/empty", "data/full", job_named=no_jobs).path
        == "data/full/"
    )
    assert service.rename(
        storage, SUBJECT, "output/job/result.txt", "artifact/r.txt", job_named=no_jobs
    ).path == ("artifact/r.txt")


def test_delete(storage: LocalStorage) -> None:
    upload(storage, "data", "tree/sub", "a.txt", b"a")
    upload(storage, "data", "", "b.txt", b"b")
    service.delete(storage, SUBJECT, "data/tree")
    service.delete(storage, SUBJECT, "data/b.txt")
    assert service.list_files(storage, SUBJECT, "data") == []
    # Nothing there: 404, so that a mistyped path is not taken for a deletion.
    for missing in ("data/tree", "data/never", "config/a/b"):
        with pytest.raises(NotFound, match="no file or folder at"):
            service.delete(storage, SUBJECT, missing)
    for area_path in ("data", "output/", "log"):
        with pytest.raises(MethodNotAllowed, match="cannot be deleted"):
            service.delete(storage, SUBJECT, area_path)
    with pytest.raises(MethodNotAllowed, match="root folder"):
        service.delete(storage, SUBJECT, "")
    with pytest.raises(UnsafePath):
        service.delete(storage, SUBJECT, "data/../..")


def test_download_target(storage: LocalStorage) -> None:
    upload(storage, "data", "run", "a.tif", b"a")
    target = service.download_target(storage, SUBJECT, "data/run/a.tif")
    assert (target.key, target.filename) == ("u1/data/run/a.tif", "a.tif")
    assert service.download_target(storage, SUBJECT, "data/run/").filename == "run"
    assert service.download_target(storage, SUBJECT, "").key == "u1"
    with pytest.raises(NotFound, match=re.escape("'log/' has no files yet")):
        service.download_target(storage, SUBJECT, "log")
    with pytest.raises(NotFound):
        service.download_target(storage, SUBJECT, "data/none")
    with pytest.raises(NotFound, match="no files yet"):
        service.download_target(storage, "u2", "/")


def test_download_url_round_trip(storage: LocalStorage, clock: Clock) -> None:
    owners = Owners()
    upload(storage, "data", "run", "a.tif", b"a")
    request = service.download_url(storage, SUBJECT, "data/run/a.tif", expires_in=60)
    assert request.method == "GET"
    assert request.model_dump().keys() == {"method", "url", "headers", "data"}
    token = token_of(request.url)
    target = signed.signed_download_target(storage, token, owner_of=owners)
    assert (target.key, target.filename) == ("u1/data/run/a.tif", "a.tif")
    owners.states[SUBJECT] = OwnerState(active=False, max_storage_bytes=None)
    with pytest.raises(SignedUrlOwnerInactive, match="disabled"):
        signed.signed_download_target(storage, token, owner_of=owners)
    owners.states.clear()
    service.delete(storage, SUBJECT, "data/run/a.tif")
    with pytest.raises(NotFound, match="no longer exists"):
        signed.signed_download_target(storage, token, owner_of=owners)
    clock.now += 61
    with pytest.raises(SignedUrlInvalid, match="expired"):
        signed.signed_download_target(storage, token, owner_of=owners)
    with pytest.raises(NotFound):
        service.download_url(storage, SUBJECT, "data/none", expires_in=60)


def test_a_download_url_does_not_upload(
    storage: LocalStorage, sessions: sessionmaker[Session]
) -> None:
    upload(storage, "data", "", "a.tif", b"a")
    request = service.download_url(storage, SUBJECT, "data/a.tif", expires_in=60)
    with pytest.raises(SignedUrlInvalid, match="not for this operation"):
        signed_upload(storage, token_of(request.url), sessions, ("x", b"x"))


def _upload_token(storage: LocalStorage, folder: str = "test/") -> str:
    request = service.upload_url(
        storage,
        SUBJECT,
        "data",
        folder,
        expires_in=60,
        max_bytes=None,
        job_named=no_jobs,
    )
    assert (request.method, request.headers, request.data) == ("POST", {}, {})
    return token_of(request.url)


def test_upload_url_round_trip(storage: LocalStorage, sessions: sessionmaker[Session]) -> None:
    token = _upload_token(storage)
    info = signed_upload(storage, token, sessions, ("data_file1.txt", b"contents"))
    assert info.path == "data/test/data_file1.txt"
    with pytest.raises(SignedUrlInvalid, match="not for this operation"):
        signed.signed_download_target(storage, token, owner_of=Owners())
    with pytest.raises(UnknownArea, match="use one of config, data, artifact"):
        service.upload_url(
            storage,
            SUBJECT,
            "output",
            "x",
            expires_in=60,
            max_bytes=None,
            job_named=no_jobs,
        )
    with pytest.raises(Conflict, match="is a file, not a folder"):
        service.upload_url(
            storage,
            SUBJECT,
            "data",
            "test/data_file1.txt",
            expires_in=60,
            max_bytes=None,
            job_named=no_jobs,
        )


def test_an_upload_url_allows_at_most_the_users_storage_limit(
    storage: LocalStorage, sessions: sessionmaker[Session]
) -> None:
    request = service.upload_url(
        storage, SUBJECT, "data", "capped", expires_in=60, max_bytes=4, job_named=no_jobs
    )
    token = token_of(request.url)
    with pytest.raises(UploadTooLarge, match="larger than the 4 bytes its upload URL allows"):
        signed_upload(storage, token, sessions, ("a.bin", b"123"), ("b.bin", b"45"))
    assert files_on_disk(storage.root) == []
    # Refused before anything was stored: the URL still works for what fits.
    signed_upload(storage, token, sessions, ("a.bin", b"1234"))
    assert (storage.root / "u1/data/capped/a.bin").read_bytes() == b"1234"


def test_an_upload_url_is_good_for_one_upload(
    storage: LocalStorage, sessions: sessionmaker[Session]
) -> None:
    token = _upload_token(storage)
    signed_upload(storage, token, sessions, ("first.txt", b"1"))
    with pytest.raises(SignedUrlUsed, match="already been used"):
        signed_upload(storage, token, sessions, ("second.txt", b"2"))
    assert paths(service.list_files(storage, SUBJECT, "data/test")) == ["data/test/first.txt"]
    # Each URL asked for is a new one, even for the same folder in the same second.
    signed_upload(storage, _upload_token(storage), sessions, ("second.txt", b"2"))


def test_a_refused_signed_upload_leaves_its_url_usable(
    storage: LocalStorage, sessions: sessionmaker[Session]
) -> None:
    token = _upload_token(storage)
    owners = Owners()
    owners.states[SUBJECT] = OwnerState(active=True, max_storage_bytes=4)
    with pytest.raises(UnsafePath):
        signed_upload(storage, token, sessions, ("../../../u2/x", b"x"), owners=owners)
    with pytest.raises(BadRequest, match="no file name"):
        signed_upload(storage, token, sessions, (None, b"x"), owners=owners)
    with pytest.raises(StorageLimitReached, match="limit of 4 bytes"):
        signed_upload(storage, token, sessions, ("big.bin", b"12345"), owners=owners)
    assert files_on_disk(storage.root) == []
    signed_upload(storage, token, sessions, ("small.bin", b"1234"), owners=owners)
    assert (storage.root / "u1/data/test/small.bin").read_bytes() == b"1234"


def test_signed_uploads_stop_when_the_owner_is_disabled(
    storage: LocalStorage, sessions: sessionmaker[Session]
) -> None:
    token = _upload_token(storage)
    owners = Owners()
    owners.states[SUBJECT] = OwnerState(active=False, max_storage_bytes=None)
    with pytest.raises(SignedUrlOwnerInactive):
        signed_upload(storage, token, sessions, ("a.txt", b"a"), owners=owners)
    assert files_on_disk(storage.root) == []


def test_several_parts_are_a_folder_upload(
    storage: LocalStorage, sessions: sessionmaker[Session]
) -> None:
    uploaded = service.upload_files(
        storage,
        SUBJECT,
        "data",
        "set",
        [
            IncomingFile("a.txt", io.BytesIO(b"a")),
            IncomingFile("sub/b.txt", io.BytesIO(b"bb")),
        ],
        job_named=no_jobs,
    )
    assert (uploaded.path, uploaded.type, uploaded.size_bytes) == ("data/set/", "directory", 3)
    assert paths(uploaded.files) == ["data/set/a.txt", "data/set/sub/b.txt"]
    token = _upload_token(storage, "signed")
    signed = signed_upload(storage, token, sessions, ("c.txt", b"c"), ("d/e.txt", b"e"))
    assert paths(signed.files) == ["data/signed/c.txt", "data/signed/d/e.txt"]
    # One bad part refuses them all, and nothing is written.
    before = files_on_disk(storage.root)
    for parts in (
        [("x.txt", b"1"), ("x.txt", b"2")],
        [("y", b"1"), ("y/z.txt", b"2")],
        [("ok.txt", b"1"), ("../bad.txt", b"2")],
        [(f"n{i}.txt", b"1") for i in range(101)],
    ):
        with pytest.raises(BadRequest):
            service.upload_files(
                storage,
                SUBJECT,
                "data",
                "set",
                [IncomingFile(name, io.BytesIO(data)) for name, data in parts],
                job_named=no_jobs,
            )
    assert files_on_disk(storage.root) == before
