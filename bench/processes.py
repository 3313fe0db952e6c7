"""Every process the benchmark starts: pinned to its CPUs, in a session of its own, and stopped.

A `Processes` object is the one owner of what the run started. Each child gets its own session
(so its process group holds whatever it forks: LiteLLM's workers, nginx's worker, a proxy's
model server) and the CPUs it was placed on (set in the child before exec, so everything it
forks inherits them). `close()` stops them all in reverse order, SIGTERM to the group, then
SIGKILL to whatever is left of it; it runs on a normal end, an error and Ctrl-C alike, so no
benchmark leaves an orphan on the machine another engineer is profiling on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

STOP_GRACE_S = 10.0


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def affinity(cpus: frozenset[int]) -> Iterator[None]:
    """This process (and what it starts meanwhile) on `cpus` for the block, then back."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@dataclass
class Child:
    """One started process: its name (for messages), its Popen, where its output goes."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    cpus: frozenset[int] | None

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(child: Child, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the child's process group, wait for the child and the group; then SIGKILL."""
    pgid = child.pid  # start_new_session: the child leads its own group
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if child.process.poll() is not None and not _group_alive(pgid):
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.process.wait(timeout=5)


class Processes:
    """Starts children and is the one place that stops them (a context manager)."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._children: list[Child] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpus: frozenset[int] | None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Child:
        """Start `argv` in a new session on `cpus` (None: wherever this process may run)."""
        self._log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self._log_dir / f"{name}.log"

        def place() -> None:  # runs in the child between fork and exec
            if cpus is not None:
                os.sched_setaffinity(0, cpus)

        with log_path.open("ab") as log:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=place,  # one syscall; the harness has no threads
            )
        child = Child(name, process, log_path, cpus)
        self._children.append(child)
        return child

    def stop(self, child: Child) -> None:
        stop_group(child)
        if child in self._children:
            self._children.remove(child)

    def close(self) -> None:
        while self._children:
            stop_group(self._children.pop())

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def wait_until(
    child: Child,
    ready: Callable[[], bool],
    timeout_s: float,
    poll_s: float = 0.05,
) -> None:
    """Poll `ready()` until true; fail with the child's log if it exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(httpx.HTTPError, OSError):
            if ready():
                return
        if not child.alive():
            raise RuntimeError(
                f"{child.name} exited ({child.process.returncode}):\n{child.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{child.name} not ready after {timeout_s:.0f} s:\n{child.log_tail()}"
            )
        time.sleep(poll_s)


def http_ok(url: str) -> Callable[[], bool]:
    """A readiness check: GET `url` answers 200 (no proxy from the environment)."""

    def check() -> bool:
        return httpx.get(url, timeout=2, trust_env=False).status_code == 200

    return check
