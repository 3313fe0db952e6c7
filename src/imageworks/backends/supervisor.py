"""Model server processes we own: spawn, wait until healthy, stop, and never lose track of one.

A server runs in its own session, so it leads a process group; signals go to the whole group and
therefore reach the workers a server forks (vLLM's engine processes, a shell wrapper's children).
Output goes to an append-only log file whose tail explains a failed start.

``spawn`` and ``wait_healthy`` are separate steps so a caller can record the process (the state
file) the moment it exists, before its health check. ``ServerProcess`` is the same for a server
we spawned and one found running after a restart: identity is pid plus start time. The caller
owns ``stop()``: in the proxy that is the GPU slot's owner task. Emergency paths that cannot
await use ``kill_now()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from subprocess import DEVNULL, STDOUT

import httpx

from imageworks.backends.base import Dialect
from imageworks.backends.procfs import (
    child_start_ticks,
    group_members,
    is_same_process,
    port_owner,
)

logger = logging.getLogger(__name__)

_EXIT_POLL_S = 0.02
_CONNECT_PROBE_S = 0.5  # a listener on loopback answers a connect at once
_HEALTH_REQUEST_MAX_S = 1.0  # a slow probe must not eat the whole start budget
_KILL_WAIT_S = 5.0  # after SIGKILL only an uninterruptible (D-state) process takes longer
_PORT_RELEASE_S = 5.0
_FAILED_START_STOP_S = 5.0  # a server that never came up has no work worth a long grace period
# A crashed server's leader is a zombie at once, but it is reaped (and its signal known) only
# once its other threads have exited: milliseconds, unless one is stuck in the kernel.
_REAP_WAIT_S = 5.0
# Signals that mean the program crashed (a kernel it cannot run here, a bad build), not that
# someone stopped it: a start that dies from one of these is worth one retry in safe mode.
CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGILL, signal.SIGBUS, signal.SIGABRT})
_TAIL_BLOCK = 8192
_TAIL_MAX_BYTES = 256 * 1024  # bounds the read when a log has no newlines (progress bars)


class ProcessState(enum.Enum):
    """Lifecycle of a ``ManagedProcess``; only ``start()`` and ``stop()`` change it.

    ========  ==========================================  ========
    from      event                                       to
    ========  ==========================================  ========
    STOPPED   start()                                     STARTING
    FAILED    start() (the old process is gone)           STARTING
    STARTING  a health path answered 2xx                  READY
    STARTING  port busy / exited / timed out / cancelled  FAILED
    READY     stop()                                      STOPPING
    FAILED    stop()                                      STOPPING
    STOPPING  the process group is gone                   STOPPED
    STOPPING  survived SIGKILL, or stop() was cancelled   FAILED
    STOPPED   stop()                                      STOPPED
    ========  ==========================================  ========

    A crash while READY does not change the state (nothing watches in the background); the owner
    sees it through ``is_alive()`` and calls ``stop()``, which settles it.
    """

    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """Everything needed to launch one server; built by the backend modules (vllm, llamacpp)."""

    name: str
    argv: tuple[str, ...]
    port: int
    log_path: Path
    host: str = "127.0.0.1"
    env: Mapping[str, str] = field(default_factory=dict)  # merged over os.environ
    health_paths: tuple[str, ...] = ("/health", "/v1/models")
    cwd: Path | None = None
    dialect: Dialect = Dialect.OPENAI  # the server it runs, for the requests sent to it
    # What the launcher's safe mode adds when this server crashes while loading (llama-server:
    # --no-repack; vLLM: --enforce-eager); empty: it has none.
    safe_mode_args: tuple[str, ...] = ()
    # What to try when it crashes even in safe mode (another build, a variable to set).
    crash_hint: str = ""
    safe_mode: bool = False  # launched with `safe_mode_args` (see `in_safe_mode`)

    def in_safe_mode(self) -> LaunchSpec:
        """This launch with the safe-mode arguments added (they go last, so they win)."""
        if self.safe_mode:
            return self
        argv = (*self.argv, *self.safe_mode_args)
        return dataclasses.replace(self, argv=argv, safe_mode=True)

    @property
    def requested_argv(self) -> tuple[str, ...]:
        """The command as the registry and the settings ask for it, safe mode aside: what
        identifies the launch (a safe-mode relaunch of an entry is still the same entry)."""
        if self.safe_mode and self.safe_mode_args:
            return self.argv[: len(self.argv) - len(self.safe_mode_args)]
        return self.argv


class StartError(Exception):
    """The server did not become ready; ``reason`` says why, ``log_tail`` shows its last words,
    ``signal`` the signal it died from (None: it did not die, or exited with a status)."""

    def __init__(
        self, reason: str, log_tail: str = "", *, died_from: signal.Signals | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.log_tail = log_tail
        self.signal = died_from

    @property
    def signal_name(self) -> str:
        return self.signal.name if self.signal is not None else "no signal"

    @property
    def crashed(self) -> bool:
        """It died from a crash signal (SIGSEGV, SIGILL, SIGBUS, SIGABRT) before it was ready."""
        return self.signal in CRASH_SIGNALS

    def __str__(self) -> str:
        if not self.log_tail:
            return self.reason
        return f"{self.reason}\n--- last log lines ---\n{self.log_tail}"


async def port_in_use(host: str, port: int) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), _CONNECT_PROBE_S)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def wait_port_free(host: str, port: int, timeout_s: float) -> None:
    """Return once nothing listens on host:port; raise TimeoutError after timeout_s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while await port_in_use(host, port):
        if loop.time() >= deadline:
            raise TimeoutError(f"port {port} on {host} still in use after {timeout_s:g} s")
        await asyncio.sleep(0.05)


class ProcessSurvived(Exception):
    """A model server is still running after SIGTERM and SIGKILL (stuck in the kernel)."""


class ServerProcess:
    """One model server in its own process group: spawned here (`spawn`), or found running in
    the state file (`ServerProcess(spec, pid, start_ticks)`), and either way ours to stop.

    Its identity is the pid together with its start time (pids are reused), and every signal is
    preceded by that check, so a process that has been replaced by a stranger is never touched.
    """

    def __init__(
        self,
        spec: LaunchSpec,
        pid: int,
        start_ticks: int,
        child: subprocess.Popen[bytes] | None = None,
    ) -> None:
        self.spec = spec
        self.pid = pid
        self.start_ticks = start_ticks
        self._child = child  # set when we spawned it: we reap it, and know its exit code
        self._inherited = False  # our child all the same: see `inherited_by_exec`
        # Group members seen while the leader lived, swept (each re-checked) once it is gone.
        self._members: dict[int, int] = {}

    @property
    def returncode(self) -> int | None:
        return self._child.poll() if self._child is not None else None

    @property
    def safe_mode(self) -> tuple[str, ...]:
        """The safe-mode arguments it runs with; empty for a normal start."""
        return self.spec.safe_mode_args if self.spec.safe_mode else ()

    def is_alive(self) -> bool:
        # The kernel knows at once (a killed child is a zombie until reaped).
        alive = is_same_process(self.pid, self.start_ticks)
        if not alive and self._child is not None and self._child.returncode is None:
            # Until our child is reaped its pid (the group id) cannot be reused, so the group's
            # members are surely its workers: note them for the sweep, then reap it.
            self._members.update(group_members(self.pid))
            self._child.poll()
        return alive

    def _gone(self) -> bool:
        """Exited for good. The leader shows as a zombie as soon as it exits, while the other
        threads of a multi-threaded server (and the memory they hold) may still be going; our
        own child is gone once it can be reaped."""
        if self.is_alive():
            return False
        if self._child is not None:
            return self._child.poll() is not None
        if not self._inherited:
            return True  # its parent reaps it
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped already
            return True
        return pid != 0

    def inherited_by_exec(self) -> None:
        """This program replaced (exec) the one that spawned the process, as a restart does:
        it is our child with no Popen to reap it, so `_gone` reaps it (else it would stay a
        zombie for the proxy's lifetime). Only then: reaping another's child steals its exit
        status from whoever spawned it."""
        self._inherited = True

    async def wait_exit(self, timeout_s: float) -> bool:
        """True once the process has exited, False if it still runs after `timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self._gone():
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(_EXIT_POLL_S)
        return True

    async def stop(self, timeout_s: float) -> None:
        """SIGTERM the group, SIGKILL it after `timeout_s`, sweep what the leader left behind,
        then wait (bounded) for the port to free. Fine if it already exited; cancelled: killed at
        once. Raises ProcessSurvived if even SIGKILL did not end it."""
        try:
            await self._stop(timeout_s)
        except asyncio.CancelledError:
            self.kill_now()
            raise

    def kill_now(self) -> None:
        """SIGKILL the group without awaiting; for paths that cannot wait."""
        self._signal_group(signal.SIGKILL)
        self._sweep()

    def log_tail(self, lines: int = 20) -> str:
        return log_tail(self.spec.log_path, lines)

    async def _stop(self, timeout_s: float) -> None:
        name = self.spec.name
        signalled = self._signal_group(signal.SIGTERM)
        # Waited for even when it had died already: a crashed child stays a zombie until it is
        # reaped, and `_gone` reaps it.
        if not await self.wait_exit(timeout_s if signalled else _REAP_WAIT_S):
            # Needed in practice: llama_cpp.server finishes an in-flight generation on SIGTERM.
            note(self.spec, f"still running {timeout_s:g} s after SIGTERM; sending SIGKILL")
            logger.warning("%s: escalating to SIGKILL (pid %d)", name, self.pid)
            self._signal_group(signal.SIGKILL)
            if not await self.wait_exit(_KILL_WAIT_S):
                logger.error("%s: pid %d survived SIGKILL", name, self.pid)
                raise ProcessSurvived(f"{name}: pid {self.pid} survived SIGKILL")
        self._sweep()
        # Also when it had died already: the leader shows as a zombie while the threads of a
        # multi-threaded server are still exiting and holding the listening socket.
        try:
            await wait_port_free(self.spec.host, self.spec.port, _PORT_RELEASE_S)
        except TimeoutError:
            # Our group is gone, so someone else holds the port; the next start will say who.
            logger.warning("%s: port %d still in use after stop", name, self.spec.port)

    def _signal_group(self, sig: signal.Signals) -> bool:
        """Signal the group if its leader is still our process; False if it is gone."""
        if not self.is_alive():
            return False
        self._members.update(group_members(self.pid))
        try:
            # start_new_session made the server a group leader, so its pid is the group id.
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def _sweep(self) -> None:
        """SIGKILL group members that outlived the leader (workers ignoring SIGTERM)."""
        for pid, start in self._members.items():
            if pid != self.pid and is_same_process(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


async def spawn(spec: LaunchSpec) -> ServerProcess:
    """Launch the server in a session of its own, output appended to its log; StartError if the
    port is taken (naming who holds it) or the program cannot be run.

    Popen rather than asyncio's subprocess: asyncio kills its children when their transport is
    closed, and a server started by `imageworks-loader activate-model` must outlive the command.
    """
    if await port_in_use(spec.host, spec.port):
        raise StartError(port_taken_message(spec))
    try:
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        # The header makes every tail self-explaining: which launch, when, with what argv.
        note(spec, f"starting {spec.name}: {shlex.join(spec.argv)}")
        # The child gets its own copy of the descriptor, so ours can close right away.
        with spec.log_path.open("ab") as log:
            child = subprocess.Popen(
                spec.argv,
                stdin=DEVNULL,
                stdout=log,
                stderr=STDOUT,
                start_new_session=True,
                env={**os.environ, **spec.env},
                cwd=spec.cwd,
            )
    except OSError as error:
        raise StartError(
            f"{spec.name}: could not launch: {error}", log_tail(spec.log_path)
        ) from error
    # Read even if it has exited already: the health check then reports how, as for any
    # other server that dies while it starts.
    ticks = child_start_ticks(child.pid)
    if ticks is None:  # no /proc entry for our own unreaped child: not Linux's /proc
        child.kill()
        await asyncio.to_thread(child.wait)
        raise StartError(f"{spec.name}: cannot read /proc/{child.pid}/stat of what it started")
    return ServerProcess(spec, child.pid, ticks, child)


def port_taken_message(spec: LaunchSpec) -> str:
    owner = port_owner(spec.port)
    who = (
        f"pid {owner.pid} ({shlex.join(owner.command) or 'command unknown'})"
        if owner is not None
        else "a process this proxy cannot see"
    )
    return (
        f"{spec.name}: port {spec.port} on {spec.host} is already in use by {who}, which this "
        "proxy did not start; stop it or choose another CHAT_PROXY_VLLM_PORT"
    )


async def wait_healthy(
    process: ServerProcess, timeout_s: float, *, poll_interval_s: float = 0.05
) -> None:
    """Return once a health path answers 2xx (polled often: a loopback GET is cheap, and up to
    one interval is added to every swap); StartError at once if the process exits, or after
    `timeout_s`. Does not stop the process: that is the caller's decision."""
    spec = process.spec
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    base = f"http://{spec.host}:{spec.port}"
    # trust_env=False: an HTTP(S)_PROXY in the environment must not capture loopback probes.
    async with httpx.AsyncClient(trust_env=False) as client:
        while True:
            for path in spec.health_paths:
                if not process.is_alive():
                    raise await _exited_while_starting(process)
                budget = min(_HEALTH_REQUEST_MAX_S, deadline - loop.time())
                if budget <= 0:
                    raise StartError(
                        f"{spec.name}: did not become ready within {timeout_s:g} s "
                        f"(log: {spec.log_path})",
                        process.log_tail(),
                    )
                try:
                    response = await client.get(base + path, timeout=budget)
                except httpx.HTTPError:
                    continue  # not listening yet, or this path hangs: try the next one
                if response.is_success:
                    return
            await asyncio.sleep(poll_interval_s)


async def _exited_while_starting(process: ServerProcess) -> StartError:
    """Why a server died before it was ready. Its signal (or exit status) is known only once it
    is reaped, which waits for its last threads: without that wait a crash would be reported as
    a plain exit now and then, and the zombie left for later."""
    spec = process.spec
    await process.wait_exit(_REAP_WAIT_S)
    code = process.returncode
    how = _describe_exit(code) if code is not None else "exited"
    return StartError(
        f"{spec.name}: {how} while starting (log: {spec.log_path})",
        process.log_tail(),
        died_from=_signal_of(code),
    )


class ManagedProcess:
    """A `ServerProcess` with a lifecycle state, for callers that start and stop one server
    over and over (autostart commands). Not safe for concurrent start()/stop()."""

    def __init__(self, spec: LaunchSpec) -> None:
        self.spec = spec
        self._state = ProcessState.STOPPED
        self._server: ServerProcess | None = None
        self._started_at: float | None = None

    @property
    def state(self) -> ProcessState:
        return self._state

    @property
    def pid(self) -> int | None:
        return self._server.pid if self._server else None

    @property
    def started_at(self) -> float | None:
        """Wall-clock (epoch) time of the spawn."""
        return self._started_at

    @property
    def returncode(self) -> int | None:
        return self._server.returncode if self._server else None

    def is_alive(self) -> bool:
        return self._server is not None and self._server.is_alive()

    async def start(self, timeout_s: float, *, poll_interval_s: float = 0.1) -> None:
        """Spawn the server and return once it answers a health path; raise StartError otherwise.

        On any failure, cancellation included, the process group is killed."""
        if self._state not in (ProcessState.STOPPED, ProcessState.FAILED) or self.is_alive():
            raise RuntimeError(
                f"{self.spec.name}: start() while {self._state.value}; stop() it first"
            )
        self._state = ProcessState.STARTING
        try:
            self._server = await spawn(self.spec)
            self._started_at = time.time()
            await wait_healthy(self._server, timeout_s, poll_interval_s=poll_interval_s)
            self._state = ProcessState.READY
        finally:
            if self._state is ProcessState.STARTING:
                if self._server is not None:
                    await stop_failed_start(self._server)
                self._state = ProcessState.FAILED

    async def stop(self, timeout_s: float) -> None:
        """SIGTERM, SIGKILL after timeout_s, wait (bounded) for the port. Idempotent. A process
        that survives even SIGKILL leaves the state FAILED and is logged; stop() does not raise.
        """
        if self._state in (ProcessState.STARTING, ProcessState.STOPPING):
            raise RuntimeError(f"{self.spec.name}: stop() while {self._state.value}")
        if self._state is ProcessState.STOPPED or self._server is None:
            self._state = ProcessState.STOPPED
            return
        self._state = ProcessState.STOPPING
        try:
            await self._server.stop(timeout_s)
            self._state = ProcessState.STOPPED
        except ProcessSurvived:
            self._state = ProcessState.FAILED
        finally:
            if self._state is ProcessState.STOPPING:  # cancelled: stop() already killed it
                self._state = ProcessState.FAILED

    def kill_now(self) -> None:
        if self._server is not None:
            self._server.kill_now()

    def log_tail(self, lines: int = 20) -> str:
        return log_tail(self.spec.log_path, lines)


async def stop_failed_start(process: ServerProcess) -> None:
    """Kill a server whose start failed; shielded, so a cancelled start still cleans up."""
    with contextlib.suppress(ProcessSurvived):
        await asyncio.shield(process.stop(_FAILED_START_STOP_S))


def log_tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of a log, read backwards from the end (logs grow large)."""
    if lines <= 0:
        return ""
    data = b""
    try:
        with path.open("rb") as log:
            position = log.seek(0, os.SEEK_END)
            while position > 0 and data.count(b"\n") <= lines and len(data) < _TAIL_MAX_BYTES:
                step = min(_TAIL_BLOCK, position)
                position -= step
                log.seek(position)
                data = log.read(step) + data
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])


def note(spec: LaunchSpec, message: str) -> None:
    """Append a supervisor line to the server's log; best effort, the operator log gets it too."""
    stamp = datetime.now().astimezone().isoformat(timespec="seconds")
    line = f"\n===== {stamp} imageworks supervisor: {message}\n"
    try:
        with spec.log_path.open("a", encoding="utf-8") as log:
            log.write(line)
    except OSError as error:
        logger.warning("%s: cannot write log %s: %s", spec.name, spec.log_path, error)


def _signal_of(returncode: int | None) -> signal.Signals | None:
    if returncode is None or returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode)
    except ValueError:
        return None


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"
