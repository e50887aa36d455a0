"""Write the runtime requirements pinned in ``poetry.lock`` as a pip requirements file.

``python3 requirements_from_lock.py poetry.lock > requirements.txt`` lists every
package of the lock's ``main`` group as ``name==version`` with its environment marker
and every hash the lock records, so ``pip install --require-hashes --no-deps -r``
installs exactly the locked runtime dependencies (no dev tools) and refuses any file
whose hash the lock does not name. It does what ``poetry export --only main`` does,
with the standard library alone, so an image build needs no Poetry and no plugin.
"""

from __future__ import annotations

import sys
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

GROUP = "main"


class LockError(ValueError):
    """The lock file is not one this script understands."""


def _marker(package: Mapping[str, Any]) -> str | None:
    """The package's environment marker for the runtime group (lock format 2.1 keeps
    one string for all groups, or one per group; a group missing there has none)."""
    markers = package.get("markers")
    if markers is None:
        return None
    if isinstance(markers, str):
        return markers
    if isinstance(markers, dict):
        value = markers.get(GROUP)
        return value if isinstance(value, str) else None
    raise LockError(f"package {package.get('name')!r}: unexpected markers {markers!r}")


def requirement_lines(lock: Mapping[str, Any]) -> Iterable[str]:
    """One requirement line per runtime package, sorted by name."""
    version = str(lock.get("metadata", {}).get("lock-version", ""))
    if not version.startswith("2."):
        raise LockError(f"lock-version {version!r}: only Poetry 2 lock files (2.x) are read")
    packages = [p for p in lock.get("package", []) if GROUP in p.get("groups", [GROUP])]
    for package in sorted(packages, key=lambda p: str(p["name"])):
        name, pinned = package["name"], package["version"]
        hashes = sorted({f["hash"] for f in package.get("files", []) if f.get("hash")})
        if not hashes:
            raise LockError(f"package {name!r} has no file hashes in the lock")
        line = f"{name}=={pinned}"
        marker = _marker(package)
        if marker:
            line += f" ; {marker}"
        yield " \\\n    ".join([line, *(f"--hash={h}" for h in hashes)])


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: requirements_from_lock.py POETRY_LOCK", file=sys.stderr)
        return 2
    try:
        lock = tomllib.loads(Path(argv[1]).read_text(encoding="utf-8"))
        lines = list(requirement_lines(lock))
    except (OSError, tomllib.TOMLDecodeError, LockError, KeyError) as exc:
        print(f"requirements_from_lock.py: {argv[1]}: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
