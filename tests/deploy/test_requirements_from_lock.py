"""images/service/requirements_from_lock.py: the service image installs exactly the
runtime group of poetry.lock, pinned and hash-checked, with each package's marker."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "images" / "service" / "requirements_from_lock.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("requirements_from_lock", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lines(lock: Mapping[str, object]) -> dict[str, str]:
    """Requirement lines by package name."""
    lines: list[str] = list(_load().requirement_lines(lock))
    return {line.split("==", 1)[0]: line for line in lines}


def test_the_repository_lock_gives_the_runtime_packages_only() -> None:
    lock = tomllib.loads((REPO_ROOT / "poetry.lock").read_text())
    lines = _lines(lock)
    for runtime in ("fastapi", "sqlalchemy", "psycopg-binary", "docker", "uvicorn"):
        assert runtime in lines
    for dev_only in ("pytest", "ruff", "mypy", "moto", "aiohttp"):
        assert dev_only not in lines
    versions = {p["name"]: p["version"] for p in lock["package"]}
    assert lines["fastapi"].startswith(f"fastapi=={versions['fastapi']} \\\n    --hash=sha256:")


def _package(name: str, **fields: object) -> dict[str, object]:
    return {
        "name": name,
        "version": "1.0",
        "groups": ["main"],
        "files": [{"file": f"{name}-1.0.tar.gz", "hash": "sha256:ab"}],
        **fields,
    }


def test_markers_of_the_runtime_group_are_kept_and_other_groups_ignored() -> None:
    lock = {
        "metadata": {"lock-version": "2.1"},
        "package": [
            _package("everywhere"),
            _package("windows", markers='sys_platform == "win32"'),
            # Its marker applies to the dev group only: unconditional at run time.
            _package("shared", groups=["main", "dev"], markers={"dev": 'python_version < "4"'}),
            _package("per-group", groups=["main", "dev"], markers={"main": 'os_name == "posix"'}),
            _package("tool", groups=["dev"]),
        ],
    }
    lines = _lines(lock)
    assert set(lines) == {"everywhere", "windows", "shared", "per-group"}
    assert lines["everywhere"] == "everywhere==1.0 \\\n    --hash=sha256:ab"
    assert lines["windows"].startswith('windows==1.0 ; sys_platform == "win32" \\')
    assert lines["shared"].startswith("shared==1.0 \\")
    assert lines["per-group"].startswith('per-group==1.0 ; os_name == "posix" \\')


@pytest.mark.parametrize(
    ("lock", "message"),
    [
        ({"metadata": {"lock-version": "1.1"}, "package": []}, "lock-version '1.1'"),
        (
            {"metadata": {"lock-version": "2.1"}, "package": [_package("bare", files=[])]},
            "'bare' has no file hashes",
        ),
    ],
)
def test_locks_it_cannot_read_are_refused(lock: dict[str, object], message: str) -> None:
    module = _load()
    with pytest.raises(module.LockError, match=message):
        list(module.requirement_lines(lock))


def test_the_command_names_the_file_it_cannot_read(tmp_path: Path) -> None:
    broken = tmp_path / "poetry.lock"
    broken.write_text("[[package]\n")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(broken)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert str(broken) in result.stderr
    assert result.stdout == ""
