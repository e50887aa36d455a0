"""Paths from users and workers become storage keys, or are refused saying why."""

from __future__ import annotations

import re

import pytest

from labcloud.contract import UPLOAD_AREAS, FileArea
from labcloud.errors import BadRequest
from labcloud.storage.paths import (
    MAX_KEY_BYTES,
    PARTIAL_PREFIX,
    UnknownArea,
    UnsafePath,
    area_key,
    check_key,
    child_key,
    normalise_path,
    split_user_key,
    user_key,
    user_relative_path,
    user_root_key,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("data/run1/a.tif", "u1/data/run1/a.tif"),
        ("data", "u1/data"),
        ("data/", "u1/data"),
        ("data//run1///a.tif", "u1/data/run1/a.tif"),
        ("data/./run1/a.tif", "u1/data/run1/a.tif"),
        ("config/with space/ü.yaml", "u1/config/with space/ü.yaml"),
        # Names are kept as sent, never decoded.
        ("data/a%20b.txt", "u1/data/a%20b.txt"),
        ("data/...", "u1/data/..."),
        ("data/..x", "u1/data/..x"),
    ],
)
def test_user_key_normalises(raw: str, expected: str) -> None:
    assert user_key("u1", raw) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("data/../output/x", "contains a '..' segment"),
        ("..", "contains a '..' segment"),
        ("data/..", "contains a '..' segment"),
        ("/data/x", "is absolute"),
        ("data\\x", "contains a backslash"),
        ("data/a\x00b", "contains a NUL character"),
        ("data/a\nb", "contains a control character"),
        ("data/a\x7fb", "contains a control character"),
        ("data/%2e%2e/x", "once percent-decoded contains a '..' segment"),
        ("data/%2E%2E/x", "once percent-decoded contains a '..' segment"),
        ("data/%2e%2e%2fx", "once percent-decoded contains a '..' segment"),
        ("data/..%2fx", "once percent-decoded contains a '..' segment"),
        ("data/a%00", "once percent-decoded contains a NUL character"),
        ("data/a%5cb", "once percent-decoded contains a backslash"),
        ("%2fdata", "once percent-decoded is absolute"),
        ("data/%252e%252e/x", "twice percent-decoded contains a '..' segment"),
        ("data/%2500", "twice percent-decoded contains a NUL character"),
        ("data/\ud800", "is not valid UTF-8"),
        ("data/" + "a" * 256, "longer than 255 bytes"),
        ("data/" + PARTIAL_PREFIX + "x", "are reserved"),
        ("", "the path is empty"),
        ("/", "is absolute"),
        ("./", "the path is empty"),
    ],
)
def test_user_key_refuses_unsafe_paths(raw: str, message: str) -> None:
    with pytest.raises(UnsafePath) as caught:
        user_key("u1", raw)
    assert message in caught.value.message
    assert caught.value.status_code == 400


def test_total_length_is_limited() -> None:
    long_path = "data/" + "/".join(["n" * 200] * 6)
    with pytest.raises(UnsafePath, match=f"at most {MAX_KEY_BYTES} bytes"):
        user_key("u1", long_path)


def test_unknown_area_names_the_areas() -> None:
    with pytest.raises(UnknownArea) as caught:
        user_key("u1", "secrets/x")
    assert caught.value.message == (
        "unknown area 'secrets': paths start with one of config, data, artifact, output, log"
    )
    assert isinstance(caught.value, BadRequest)


def test_allowed_areas_are_enforced_and_named() -> None:
    assert user_key("u1", "artifact/m.pt", allowed_areas=UPLOAD_AREAS) == "u1/artifact/m.pt"
    with pytest.raises(UnknownArea) as caught:
        user_key("u1", "output/job/x", allowed_areas=UPLOAD_AREAS)
    assert caught.value.message == (
        "area 'output' is not allowed here: use one of config, data, artifact"
    )
    with pytest.raises(UnknownArea, match=r"unknown area 'nope': .* config, data, artifact$"):
        user_key("u1", "nope/x", allowed_areas=UPLOAD_AREAS)


@pytest.mark.parametrize("subject", ["", ".", "..", "a/b", "a\\b", ".hidden", "a b", "x" * 129])
def test_subject_must_be_one_safe_folder_name(subject: str) -> None:
    with pytest.raises(UnsafePath, match="cannot name a folder"):
        user_key(subject, "data/x")


@pytest.mark.parametrize("subject", ["17", "0b6c1c9e-8f1d-4a54-b0c2-1f0e5b0f6a7d", "a.b@c+d_e-f"])
def test_good_subjects(subject: str) -> None:
    assert user_root_key(subject) == subject
    assert area_key(subject, FileArea.LOG) == f"{subject}/log"


def test_child_key() -> None:
    assert child_key("u1/data/run1", "a.tif") == "u1/data/run1/a.tif"
    assert child_key("u1/data", "sub/b.tif") == "u1/data/sub/b.tif"
    with pytest.raises(UnsafePath, match=re.escape("'..' segment")):
        child_key("u1/data", "../../etc/passwd")
    with pytest.raises(UnsafePath, match="is empty"):
        child_key("u1/data", ".//")
    with pytest.raises(UnsafePath, match="not a normalised storage key"):
        child_key("u1/data/", "a")


@pytest.mark.parametrize("key", ["", "/u1/data", "u1//data", "u1/./data", "u1/../x", "u1/data/"])
def test_check_key_refuses_non_normal_keys(key: str) -> None:
    with pytest.raises(UnsafePath):
        check_key(key)


def test_split_and_relative() -> None:
    parts = split_user_key("u1/data/run1/a.tif")
    assert parts == ("u1", FileArea.DATA, "run1/a.tif")
    assert split_user_key("u1/log").relative == ""
    assert user_relative_path("u1/data/run1/a.tif") == "data/run1/a.tif"
    assert user_relative_path("u1/output") == "output"
    with pytest.raises(UnsafePath, match="root folder"):
        split_user_key("u1")
    with pytest.raises(UnknownArea):
        split_user_key("u1/elsewhere/x")


def test_normalise_path_keeps_names() -> None:
    assert normalise_path("") == ""
    assert normalise_path("a/b/") == "a/b"
