"""Process facts from /proc: is a pid alive (not a zombie), and is it still the same process?

A pid alone is not an identity (pids are reused), so a process is recorded with its start time
in clock ticks since boot, and only the same pid with the same start time counts as the same
process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

_DEAD = frozenset({"Z", "X"})  # zombie (exited, not yet reaped) and dead


class _Stat(NamedTuple):
    state: str
    pgrp: int
    start: int


def _read_stat(pid: int) -> _Stat | None:
    if pid <= 0:
        return None
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and ')', so split at the last ')'.
    rest = raw.rpartition(b")")[2].split()
    return _Stat(rest[0].decode("ascii"), int(rest[2]), int(rest[19]))


def process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; None if it does not exist or has
    exited (a zombie, waiting for its parent to reap it)."""
    stat = _read_stat(pid)
    return None if stat is None or stat.state in _DEAD else stat.start


def is_same_process(pid: int, process_start: int) -> bool:
    """True if `pid` is alive and is the process that started at `process_start`."""
    return process_start_ticks(pid) == process_start


def group_members(pgid: int) -> dict[int, int]:
    """Live members of process group `pgid`, as pid -> start ticks."""
    stats = ((int(name), _read_stat(int(name))) for name in os.listdir("/proc") if name.isdigit())
    return {pid: s.start for pid, s in stats if s and s.pgrp == pgid and s.state not in _DEAD}
