"""No process outlives the test run: a pytest plugin (tests/conftest.py registers it).

At its start the session marks itself in the environment (support.session_processes), so every
process a test starts, directly or not (a proxy, the model server it starts, a loader), carries
the mark and the name of the test it started in. Then:

- SIGTERM or SIGINT to pytest: the marked processes are stopped first (SIGTERM, SIGKILL what
  still runs a few seconds later), then pytest stops as on Ctrl-C (KeyboardInterrupt: the
  teardowns, the report, exit status 2). The summary lists what was stopped.
- pytest killed outright (SIGKILL, as a CI time limit may) or dying some other way: its
  watchdog, a small process of its own, stops the marked processes once pytest is gone, and
  the tests' own children get SIGTERM from the kernel at once (support.child_processes).
- At the end, after every fixture's teardown, a marked process still running is one a test
  started and did not stop: it is stopped, and the run fails with an error at the teardown of
  its last test that names each such process (pid, command, the test it started in).

Only processes of this session are touched: another session (a colleague's run on the same
machine) has a mark of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from support import session_processes
from support.session_processes import SessionProcess

# How long processes get to end after SIGTERM, and how long a process that a teardown just
# killed may take to exit before it counts as left running.
GRACE_S = 5.0
SETTLE_S = 2.0
_WATCHDOG = Path(session_processes.__file__)
_HYGIENE = pytest.StashKey["ProcessHygiene"]()


class ProcessHygiene:
    """The plugin's state for one session: its mark, its watchdog, what it stopped."""

    def __init__(self) -> None:
        self.session = uuid.uuid4().hex
        self.variable = session_processes.variable(self.session)
        self.stopped: list[str] = []  # what an interrupt (or an interrupted end) stopped
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._previous: dict[int, Any] = {}
        self._stopping = False
        self._interrupted = False
        self._in_test = False

    def start(self) -> None:
        # The watchdog is not a process of the tests: it starts before the mark is set, and in
        # a session of its own, out of reach of a terminal's Ctrl-C and of signals to our group.
        self._watchdog = subprocess.Popen(
            [sys.executable, "-I", str(_WATCHDOG), self.session],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,  # never holds pytest's output open (`pytest | tee`)
            start_new_session=True,
        )
        os.environ[self.variable] = "collection"
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous = signal.getsignal(signum)
                if previous is not signal.SIG_IGN:  # e.g. SIGINT in a background job
                    self._previous[signum] = previous
                    signal.signal(signum, self._on_signal)

    def end(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        os.environ.pop(self.variable, None)
        if self._watchdog is not None:
            assert self._watchdog.stdin is not None
            self._watchdog.stdin.close()  # it stops what is left (nothing, by now) and exits
            try:
                self._watchdog.wait(timeout=GRACE_S + 5)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
                self._watchdog.wait()

    def find(self) -> list[SessionProcess]:
        watchdog = [self._watchdog.pid] if self._watchdog is not None else []
        return [p for p in session_processes.find(self.session, exclude=watchdog) if not _ours(p)]

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Generator[None, object, object]:
        os.environ[self.variable] = item.nodeid
        self._in_test = True
        try:
            return (yield)
        finally:
            self._in_test = False

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.stopped:
            terminalreporter.section("processes the tests started", red=True)
            for line in self.stopped:
                terminalreporter.write_line(line)

    def check(self, session: pytest.Session) -> None:
        """After the last teardown: stop what is still running, and fail the run if a test left
        it (not after an interrupt, which stopped the tests half-way)."""
        left = session_processes.wait_gone(self.find(), SETTLE_S)
        if not left:
            return
        stubborn = {process.pid for process in session_processes.stop(left, GRACE_S)}
        lines = _lines([(process, process.pid in stubborn) for process in left])
        if self._interrupted or session.exitstatus == pytest.ExitCode.INTERRUPTED:
            self.stopped += ["stopped after the interrupt:", *lines]
            return
        message = "\n".join(
            [f"{_count(left)} that the tests started still ran at the end (now stopped):", *lines]
        )
        if self._in_test:  # the run's last teardown: an error there, as pytest reports them
            pytest.fail(message, pytrace=False)
        # Torn down at the session's end (after -x, or pytest.exit): nothing to attach it to.
        self.stopped.append(message)
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        __tracebackhide__ = True  # pytest reports where the test was when the signal came
        if self._stopping:  # sent again while we stop (a terminal and `uv run` may both send it)
            return
        name = signal.Signals(signum).name
        if not self._interrupted:
            self._interrupted = True
            self._stopping = True
            try:
                stopped = session_processes.sweep(self.find, GRACE_S)
                self.stopped += [f"stopped on {name}:", *_lines(stopped)] if stopped else []
            finally:
                self._stopping = False
        previous = self._previous[signum]
        if callable(previous):  # SIGINT's default_int_handler raises KeyboardInterrupt
            previous(signum, frame)
        raise KeyboardInterrupt(name)


def _ours(process: SessionProcess) -> bool:
    """The interpreter's own helpers, which end with pytest: multiprocessing's resource tracker
    (started by the first Process of the "spawn" context) and forkserver."""
    return process.ppid == os.getpid() and any(
        f"from multiprocessing.{helper} import main" in process.command
        for helper in ("resource_tracker", "forkserver")
    )


def _lines(stopped: list[tuple[SessionProcess, bool]]) -> list[str]:
    return [f"  {p.describe()}{' (needed SIGKILL)' if killed else ''}" for p, killed in stopped]


def _count(processes: list[SessionProcess]) -> str:
    return f"{len(processes)} process{'es' if len(processes) != 1 else ''}"


def pytest_configure(config: pytest.Config) -> None:
    hygiene = ProcessHygiene()
    config.stash[_HYGIENE] = hygiene
    config.pluginmanager.register(hygiene, "process-hygiene")
    hygiene.start()


def pytest_unconfigure(config: pytest.Config) -> None:
    hygiene = config.stash.get(_HYGIENE, None)
    if hygiene is not None:
        hygiene.end()


@pytest.fixture(scope="session", autouse=True)
def _no_process_outlives_the_run(request: pytest.FixtureRequest) -> Iterator[None]:
    """Set up before, so torn down after, every other fixture of the run."""
    yield
    request.config.stash[_HYGIENE].check(request.session)


def session_of(config: pytest.Config) -> str:
    """The id of the running session (for session_processes.find)."""
    return config.stash[_HYGIENE].session
