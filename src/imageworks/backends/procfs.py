"""Process facts from /proc: is a pid alive (not a zombie), is it still the same process, and
who listens on a TCP port?

A pid alone is not an identity (pids are reused), so a process is recorded with its start time
in clock ticks since boot, and only the same pid with the same start time counts as the same
process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

_DEAD = frozenset({"Z", "X"})  # zombie (exited, not yet reaped) and dead
_TCP_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
_TCP_LISTEN = "0A"


class _Stat(NamedTuple):
    state: str
    ppid: int
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
    return _Stat(rest[0].decode("ascii"), int(rest[1]), int(rest[2]), int(rest[19]))


def parent_pid(pid: int) -> int | None:
    """The pid of the process's parent; None if it does not exist."""
    stat = _read_stat(pid)
    return stat.ppid if stat is not None else None


def process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; None if it does not exist or has
    exited (a zombie, waiting for its parent to reap it)."""
    stat = _read_stat(pid)
    return None if stat is None or stat.state in _DEAD else stat.start


def child_start_ticks(pid: int) -> int | None:
    """The start time of our own child `pid`, also once it has exited: until we reap it, its
    pid cannot be reused, so even a zombie's start time identifies it. None if it is gone."""
    stat = _read_stat(pid)
    return stat.start if stat is not None else None


def is_same_process(pid: int, process_start: int) -> bool:
    """True if `pid` is alive and is the process that started at `process_start`."""
    return process_start_ticks(pid) == process_start


def group_members(pgid: int) -> dict[int, int]:
    """Live members of process group `pgid`, as pid -> start ticks."""
    stats = ((int(name), _read_stat(int(name))) for name in os.listdir("/proc") if name.isdigit())
    return {pid: s.start for pid, s in stats if s and s.pgrp == pgid and s.state not in _DEAD}


@dataclass(frozen=True, slots=True)
class PortOwner:
    """The process listening on a TCP port."""

    pid: int
    command: list[str]


def port_owner(port: int) -> PortOwner | None:
    """The process listening on TCP `port` (IPv4 or IPv6, any local address); None if nobody
    listens, or if the listener belongs to a process we may not look into.

    Scans every process's open files, so it is for the moment a port is found busy, not a loop.
    Several processes can share one listening socket (a fork); the lowest pid is reported.
    """
    links = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not links:
        return None
    for pid in sorted(int(name) for name in os.listdir("/proc") if name.isdigit()):
        if _holds_any(pid, links) and (command := _command(pid)) is not None:
            return PortOwner(pid, command)
    return None


def _listening_inodes(port: int) -> set[str]:
    # Lines: "sl local_address rem_address st ... uid timeout inode ...", addresses as HEX:PORT.
    inodes: set[str] = set()
    for table in _TCP_TABLES:
        try:
            rows = table.read_text().splitlines()[1:]
        except OSError:  # no IPv6 in this kernel
            continue
        for row in rows:
            fields = row.split()
            if len(fields) < 10 or fields[3] != _TCP_LISTEN or fields[9] == "0":
                continue
            if int(fields[1].rpartition(":")[2], 16) == port:
                inodes.add(fields[9])
    return inodes


def _holds_any(pid: int, links: set[str]) -> bool:
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:  # gone, or not ours to look into
        return False
    for fd in fds:
        try:
            if os.readlink(f"{fd_dir}/{fd}") in links:
                return True
        except OSError:  # closed while we looked
            continue
    return False


def _command(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        if not raw:  # a kernel thread, or argv wiped: fall back to the short name
            return [Path(f"/proc/{pid}/comm").read_text().strip()]
    except OSError:
        return None
    args = raw.split(b"\0")
    if args[-1] == b"":  # the usual NUL after the last argument
        args.pop()
    return [os.fsdecode(arg) for arg in args]
