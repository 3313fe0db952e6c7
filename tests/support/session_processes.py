"""The processes of one test session, found by the mark in their environment, and stopped.

A session marks itself with one variable, `TEST_SESSION_<id>`, whose value names the test that
is running (see support.process_hygiene). Every process started while it is set inherits it:
the proxy and the loader the tests start, the model servers those start, and so on down. So
the process table itself says which processes a session started, and during which test; a
concurrent session (another developer's run) has another id, and a nested one (a test that runs
pytest) adds its own variable to the ones it inherited. A process that clears its environment
(`env -i`) cannot be seen this way.

Only the standard library: this file also runs as a script, as the session's watchdog:

    python session_processes.py SESSION_ID    # stops the session's processes at stdin's EOF

Its stdin is a pipe that only pytest holds, so EOF comes when pytest exits, however it exits
(SIGKILL included), and the watchdog then stops whatever the session left running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

PREFIX = "TEST_SESSION_"
POLL_S = 0.02


def variable(session: str) -> str:
    """The environment variable that marks the processes of `session`."""
    return f"{PREFIX}{session}"


@dataclass(frozen=True)
class SessionProcess:
    """A live process of a session: `test` is the one that was running when it started."""

    pid: int
    ppid: int
    pgid: int
    start_ticks: int  # with the pid, its identity (pids are reused)
    test: str
    command: str

    def describe(self, width: int = 300) -> str:
        """One line; a long command (a `python -c` script) is cut at `width` characters."""
        command = self.command.replace("\n", "\\n")
        if len(command) > width:
            command = command[: width - 3] + "..."
        return f"pid {self.pid} (parent {self.ppid}), started during {self.test}: {command}"


def find(session: str, *, exclude: Iterable[int] = ()) -> list[SessionProcess]:
    """The session's live processes (zombies are not: they have exited), oldest pid first;
    never this process, nor the pids in `exclude`. Unreadable /proc entries are skipped (another
    user's processes, or ones that exit while we look)."""
    needle = f"{variable(session)}=".encode()
    skip = {os.getpid(), *exclude}
    found = []
    for pid in _pids():
        if pid in skip:
            continue
        test = _marked(pid, needle)
        if test is None:
            continue
        process = _describe(pid, test)
        if process is not None:
            found.append(process)
    return sorted(found, key=lambda process: process.pid)


def alive(process: SessionProcess) -> bool:
    """Still running, and still the process we found (not a zombie, not a reused pid)."""
    stat = _stat(process.pid)
    return stat is not None and stat[3] == process.start_ticks and stat[0] not in "ZX"


def wait_gone(processes: Iterable[SessionProcess], timeout_s: float) -> list[SessionProcess]:
    """Wait up to `timeout_s` for the processes to exit; those still running then."""
    waiting = list(processes)
    deadline = time.monotonic() + timeout_s
    while True:
        waiting = [process for process in waiting if alive(process)]
        if not waiting or time.monotonic() >= deadline:
            return waiting
        time.sleep(POLL_S)


def stop(processes: Iterable[SessionProcess], grace_s: float = 5.0) -> list[SessionProcess]:
    """SIGTERM each process (its whole group where it leads one: a model server's workers),
    SIGKILL those still running after `grace_s`. Returns the ones that needed SIGKILL."""
    waiting = list(processes)
    _signal(waiting, signal.SIGTERM)
    stubborn = wait_gone(waiting, grace_s)
    _signal(stubborn, signal.SIGKILL)
    wait_gone(stubborn, 2.0)  # SIGKILL is delivered at once, the exit takes a moment
    return stubborn


def sweep(
    find: Callable[[], list[SessionProcess]], grace_s: float = 5.0, rounds: int = 3
) -> list[tuple[SessionProcess, bool]]:
    """Stop what `find` returns, and again what it returns then (started meanwhile: a model
    server its proxy spawned as we looked), up to `rounds` times. Each stopped process, with
    whether it needed SIGKILL."""
    stopped: list[tuple[SessionProcess, bool]] = []
    for _ in range(rounds):
        found = find()
        if not found:
            break
        stubborn = {process.pid for process in stop(found, grace_s)}
        stopped += [(process, process.pid in stubborn) for process in found]
    return stopped


def _signal(processes: Iterable[SessionProcess], sig: signal.Signals) -> None:
    ours = os.getpgrp()
    for process in processes:
        if not alive(process):
            continue
        with contextlib.suppress(ProcessLookupError):
            if process.pgid == process.pid and process.pgid != ours:
                os.killpg(process.pgid, sig)
            else:
                os.kill(process.pid, sig)


def _pids() -> Iterator[int]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


def _marked(pid: int, needle: bytes) -> str | None:
    """The value of the session's variable in the process's environment, None without it."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as file:
            environ = file.read()
    except OSError:
        return None
    if environ.startswith(needle):
        start = len(needle)
    else:
        start = environ.find(b"\0" + needle)
        if start < 0:
            return None
        start += 1 + len(needle)
    end = environ.find(b"\0", start)
    return environ[start : end if end >= 0 else len(environ)].decode(errors="replace")


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """State, parent pid, process group and start time (clock ticks after boot) of `pid`."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            # The command name (field 2) is in parentheses and may hold anything: split after it.
            fields = file.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[19])


def _describe(pid: int, test: str) -> SessionProcess | None:
    stat = _stat(pid)
    if stat is None or stat[0] in "ZX":
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            argv = file.read().rstrip(b"\0").split(b"\0")
    except OSError:
        return None
    command = " ".join(arg.decode(errors="replace") for arg in argv)
    return SessionProcess(pid, stat[1], stat[2], stat[3], test, command)


def watch(session: str) -> None:
    """Block until stdin's EOF, then stop the session's processes."""
    with contextlib.suppress(OSError):
        while os.read(sys.stdin.fileno(), 4096):
            pass
    sweep(lambda: find(session))


if __name__ == "__main__":
    watch(sys.argv[1])
