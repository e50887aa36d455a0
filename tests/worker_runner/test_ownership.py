"""Handing a job folder to the user its container runs as (real ``chown``; the
project's test machines run as root, as a runner that does this must)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker_runner.ownership import FolderNotHandedOver, hand_over, parse_user


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "files"
    (folder / "data" / "deep").mkdir(parents=True)
    (folder / "data" / "deep" / "in.txt").write_text("input")
    (folder / "output").mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("not the job's")
    (folder / "data" / "link").symlink_to(outside)
    return folder, outside


def test_every_file_goes_to_the_user_and_symlinks_are_not_followed(tmp_path: Path) -> None:
    folder, outside = _tree(tmp_path)
    before = outside.stat()
    hand_over(folder, "4321")
    for path in (folder, *folder.rglob("*")):
        info = path.lstat()
        assert info.st_uid == 4321, path
        assert info.st_gid == before.st_gid, path  # no group asked: unchanged
    assert (outside.stat().st_uid, outside.stat().st_gid) == (before.st_uid, before.st_gid)

    hand_over(folder, "4321:8765")
    assert {path.lstat().st_gid for path in (folder, *folder.rglob("*"))} == {8765}


def test_a_runner_that_is_not_root_refuses_another_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, _ = _tree(tmp_path)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(os, "getegid", lambda: 1000)
    with pytest.raises(FolderNotHandedOver, match=r"runs as uid 1000.*run the runner as root"):
        hand_over(folder, "4321")
    # Its own user needs nothing.
    hand_over(folder, "1000")
    hand_over(folder, "1000:1000")
    assert folder.stat().st_uid == os.stat(tmp_path).st_uid


def test_parse_user() -> None:
    assert parse_user("1000") == (1000, None)
    assert parse_user("1000:100") == (1000, 100)
    with pytest.raises(FolderNotHandedOver, match="not 'uid' or 'uid:gid'"):
        parse_user("nobody")
