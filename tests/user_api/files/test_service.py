"""The files service on a real local storage folder (no HTTP)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from labcloud.errors import BadRequest, Conflict, MethodNotAllowed, NotFound
from labcloud.storage.base import EntryType
from labcloud.storage.local import LocalStorage
from labcloud.storage.paths import UnknownArea, UnsafePath
from labcloud.storage.signing import SignedUrlInvalid, TransferPurpose, UrlSigner
from user_api.files import service
from user_api.files.schemas import FileInfo

SUBJECT = "u1"
BASE_URL = "http://127.0.0.1:8000"
AREAS = ["artifact/", "config/", "data/", "log/", "output/"]


class Clock:
    now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def signer(clock: Clock) -> UrlSigner:
    return UrlSigner(b"s" * 32, clock=clock)


def upload(storage: LocalStorage, area: str, folder: str, name: str, data: bytes) -> FileInfo:
    return service.upload_file(
        storage, SUBJECT, area, folder, filename=name, stream=io.BytesIO(data)
    )


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
    service.upload_file(storage, "u2", "data", "", filename="theirs.txt", stream=io.BytesIO(b"u2"))
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
        ("data", "x", "", BadRequest, "the upload has no file name"),
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
    service.make_folder(storage, SUBJECT, "data", "run1/sub")
    with pytest.raises(Conflict, match=re.escape("'data/run1/sub/' is a folder")):
        upload(storage, "data", "run1", "sub", b"x")
    upload(storage, "data", "", "plain.txt", b"x")
    with pytest.raises(Conflict, match=re.escape("'data/plain.txt' is a file, not a folder")):
        upload(storage, "data", "plain.txt/deeper", "a.txt", b"x")
    # Replacing a file is allowed.
    assert upload(storage, "data", "", "plain.txt", b"longer").size_bytes == 6


def test_make_folder(storage: LocalStorage) -> None:
    info = service.make_folder(storage, SUBJECT, "data", "new/nested/")
    assert info == FileInfo(
        path="data/new/nested/", type=EntryType.DIRECTORY, size="", size_bytes=0
    )
    assert service.make_folder(storage, SUBJECT, "data", "new/nested") == info
    upload(storage, "data", "", "f", b"x")
    with pytest.raises(Conflict, match=re.escape("'data/f' is a file, not a folder")):
        service.make_folder(storage, SUBJECT, "data", "f")
    with pytest.raises(UnknownArea, match="config, data, artifact"):
        service.make_folder(storage, SUBJECT, "output", "x")


def test_rename_file(storage: LocalStorage) -> None:
    upload(storage, "data", "test", "one.txt", b"one")
    upload(storage, "data", "test", "two.txt", b"two")
    renamed = service.rename(storage, SUBJECT, "data/test/one.txt", "artifact/moved/one.txt")
    assert renamed == FileInfo(
        path="artifact/moved/one.txt", type=EntryType.FILE, size="3 Bytes", size_bytes=3
    )
    assert paths(service.list_files(storage, SUBJECT, "data/test")) == ["data/test/two.txt"]
    # Renaming onto itself changes nothing.
    assert service.rename(storage, SUBJECT, "data/test/two.txt", "data/test//two.txt").path == (
        "data/test/two.txt"
    )


def test_rename_refusals(storage: LocalStorage) -> None:
    upload(storage, "data", "test", "one.txt", b"one")
    upload(storage, "data", "test", "two.txt", b"two")
    storage.write("u1/output/job/result.txt", io.BytesIO(b"r"))  # as a job's result
    service.make_folder(storage, SUBJECT, "data", "empty")
    with pytest.raises(NotFound, match=re.escape("'data/none.txt'")):
        service.rename(storage, SUBJECT, "data/none.txt", "data/x.txt")
    with pytest.raises(MethodNotAllowed, match=re.escape("area folder 'data/'")):
        service.rename(storage, SUBJECT, "data/", "/data/new")
    with pytest.raises(MethodNotAllowed, match="root folder"):
        service.rename(storage, SUBJECT, "/", "data/new")
    with pytest.raises(MethodNotAllowed, match=re.escape("'data/test/' is not empty")):
        service.rename(storage, SUBJECT, "data/test", "data/other")
    with pytest.raises(Conflict, match=re.escape("'data/test/two.txt' already exists")):
        service.rename(storage, SUBJECT, "data/test/one.txt", "data/test/two.txt")
    with pytest.raises(Conflict, match=re.escape("'config/' already exists")):
        service.rename(storage, SUBJECT, "data/test/one.txt", "config")
    with pytest.raises(UnknownArea, match="use one of config, data, artifact"):
        service.rename(storage, SUBJECT, "data/test/one.txt", "output/one.txt")
    with pytest.raises(UnsafePath, match="is absolute"):
        service.rename(storage, SUBJECT, "data/test/one.txt", "/data/abs.txt")
    with pytest.raises(UnsafePath, match=re.escape("'..' segment")):
        service.rename(storage, SUBJECT, "data/test/one.txt", "data/../../u2/data/x")
    with pytest.raises(BadRequest, match="into itself"):
        service.rename(storage, SUBJECT, "data/empty", "data/empty/inner")
    with pytest.raises(Conflict, match=re.escape("'data/test/one.txt' is a file, not a folder")):
        service.rename(storage, SUBJECT, "data/test/two.txt", "data/test/one.txt/two.txt")
    before = files_on_disk(storage.root)
    assert "u1/data/test/one.txt" in before
    # An empty folder moves; a job's result may be kept as an artifact.
    assert service.rename(storage, SUBJECT, "data/empty", "data/full").path == "data/full/"
    assert service.rename(storage, SUBJECT, "output/job/result.txt", "artifact/r.txt").path == (
        "artifact/r.txt"
    )


def test_delete(storage: LocalStorage) -> None:
    upload(storage, "data", "tree/sub", "a.txt", b"a")
    upload(storage, "data", "", "b.txt", b"b")
    service.delete(storage, SUBJECT, "data/tree")
    service.delete(storage, SUBJECT, "data/tree")
    service.delete(storage, SUBJECT, "data/b.txt")
    service.delete(storage, SUBJECT, "data/never")
    assert service.list_files(storage, SUBJECT, "data") == []
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


def test_download_url_round_trip(storage: LocalStorage, signer: UrlSigner, clock: Clock) -> None:
    upload(storage, "data", "run", "a.tif", b"a")
    request = service.download_url(
        storage, signer, SUBJECT, "data/run/a.tif", base_url=BASE_URL + "/", expires_in=60
    )
    assert request.method == "GET"
    assert request.model_dump().keys() == {"method", "url", "headers", "data"}
    token = token_of(request.url)
    target = service.signed_download_target(storage, signer, token)
    assert (target.key, target.filename) == ("u1/data/run/a.tif", "a.tif")
    with pytest.raises(SignedUrlInvalid, match="not for this operation"):
        service.signed_upload(storage, signer, token, filename="x", stream=io.BytesIO(b"x"))
    service.delete(storage, SUBJECT, "data/run/a.tif")
    with pytest.raises(NotFound, match="no longer exists"):
        service.signed_download_target(storage, signer, token)
    clock.now += 61
    with pytest.raises(SignedUrlInvalid, match="expired"):
        service.signed_download_target(storage, signer, token)
    with pytest.raises(NotFound):
        service.download_url(
            storage, signer, SUBJECT, "data/none", base_url=BASE_URL, expires_in=60
        )


def test_upload_url_round_trip(storage: LocalStorage, signer: UrlSigner) -> None:
    request = service.upload_url(
        storage, signer, SUBJECT, "data", "test/", base_url=BASE_URL, expires_in=60
    )
    assert (request.method, request.headers, request.data) == ("POST", {}, {})
    token = token_of(request.url)
    info = service.signed_upload(
        storage, signer, token, filename="data_file1.txt", stream=io.BytesIO(b"contents")
    )
    assert info.path == "data/test/data_file1.txt"
    # The same link takes several files, each under its own name.
    service.signed_upload(storage, signer, token, filename="second.txt", stream=io.BytesIO(b"2"))
    assert paths(service.list_files(storage, SUBJECT, "data/test")) == [
        "data/test/data_file1.txt",
        "data/test/second.txt",
    ]
    with pytest.raises(UnsafePath):
        service.signed_upload(
            storage, signer, token, filename="../../../u2/x", stream=io.BytesIO(b"x")
        )
    with pytest.raises(BadRequest, match="no file name"):
        service.signed_upload(storage, signer, token, filename=None, stream=io.BytesIO(b"x"))
    with pytest.raises(SignedUrlInvalid, match="not for this operation"):
        service.signed_download_target(storage, signer, token)
    with pytest.raises(UnknownArea, match="use one of config, data, artifact"):
        service.upload_url(
            storage, signer, SUBJECT, "output", "x", base_url=BASE_URL, expires_in=60
        )
    with pytest.raises(Conflict, match="is a file, not a folder"):
        service.upload_url(
            storage, signer, SUBJECT, "data", "test/second.txt", base_url=BASE_URL, expires_in=60
        )


def test_signed_upload_to_an_exact_key(storage: LocalStorage, signer: UrlSigner) -> None:
    # As the worker API signs them: one file at one key.
    token = signer.token(key="u1/output/job/r.txt", purpose=TransferPurpose.UPLOAD, expires_in=60)
    info = service.signed_upload(
        storage, signer, token, filename="ignored", stream=io.BytesIO(b"r")
    )
    assert info.path == "output/job/r.txt"
    service.make_folder(storage, SUBJECT, "data", "dir")
    folder_token = signer.token(key="u1/data/dir", purpose=TransferPurpose.UPLOAD, expires_in=60)
    with pytest.raises(Conflict, match="is a folder"):
        service.signed_upload(storage, signer, folder_token, filename="x", stream=io.BytesIO(b"x"))
