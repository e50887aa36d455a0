"""What the subcommands print: aligned tables, sizes, local times and durations, JSON
for scripts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], numeric: int = 0) -> str:
    """Columns aligned with two spaces between them; the last ``numeric`` columns
    are right-aligned."""
    cells = [[str(h) for h in headers], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    first_numeric = len(headers) - numeric
    lines = []
    for row in cells:
        parts = [
            cell.rjust(width) if index >= first_numeric else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def human_bytes(count: int | None) -> str:
    """``1536`` -> ``1.5 KiB``; None -> ``unlimited``."""
    if count is None:
        return "unlimited"
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{count} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def local_time(value: str | None) -> str:
    """An ISO time from the server (UTC) on this machine's clock; "" for none."""
    if not value:
        return ""
    return datetime.fromisoformat(value).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def duration(seconds: float) -> str:
    """``3725`` -> ``1h 2m``: the two largest units."""
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def as_json(value: Any) -> str:
    """``value`` for a script to read: indented JSON, keys in the server's order."""
    return json.dumps(value, indent=2, ensure_ascii=False)
