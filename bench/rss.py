"""Resident memory of a server, counted over its whole process tree, from /proc.

A server may be several processes (nginx's master and worker, LiteLLM's uvicorn parent and
worker, a shell wrapper): the number that matters is what the tree holds, so VmRSS is summed
over the process and all its descendants. Pages shared between them are counted once per
process, which overstates a forking server a little; the output says it is a sum.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

PROC = Path("/proc")


def _parent_of(pid: int) -> int | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants(root: int) -> list[int]:
    """`root` and every process below it, from one pass over the process table."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            parent = _parent_of(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def vm_rss_kib(pid: int) -> int:
    """One process's VmRSS in KiB (0 when it is gone or a zombie)."""
    with contextlib.suppress(OSError):
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def tree_rss_mib(root: int) -> float:
    """VmRSS summed over `root`'s process tree, in MiB."""
    return sum(vm_rss_kib(pid) for pid in descendants(root)) / 1024
