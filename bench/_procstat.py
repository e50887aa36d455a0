"""CPU time of processes, read from ``/proc`` (Linux): where a benchmark's CPU
went on a machine where client, servers and database share the same cores."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces.
    return raw[raw.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (0 when it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # After the name: state, ppid, ... utime is field 14 of the full line.
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _all_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    parents: dict[int, list[int]] = {}
    for child in _all_pids():
        fields = _stat_fields(child)
        if fields is not None:
            parents.setdefault(int(fields[1]), []).append(child)
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        pending.extend(parents.get(current, []))
    return found


def named(name: str) -> list[int]:
    """Processes whose command name is ``name`` (e.g. ``postgres``, ``dockerd``)."""
    pids = []
    for pid in _all_pids():
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm == name:
            pids.append(pid)
    return pids


def total_cpu(pids: Iterable[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def _socket_inodes(port: int) -> dict[str, set[str]]:
    """Inodes of the TCP sockets whose local port is ``port``, by state
    (``01`` established, ``0A`` listening)."""
    inodes: dict[str, set[str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.setdefault(fields[3], set()).add(fields[9])
    return inodes


def connections(pids: Iterable[int], port: int) -> dict[int, int]:
    """How many established connections to ``port`` each process that listens on
    it holds: how a multi-process server's connections are spread."""
    inodes = _socket_inodes(port)
    established, listening = inodes.get("01", set()), inodes.get("0A", set())
    held = {}
    for pid in pids:
        try:
            sockets = {str(fd.readlink())[8:-1] for fd in Path(f"/proc/{pid}/fd").iterdir()}
        except OSError:  # the process or one of its descriptors went away
            continue
        if sockets & listening:
            held[pid] = len(sockets & established)
    return held
