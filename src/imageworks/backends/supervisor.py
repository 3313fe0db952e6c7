"""One model server process we own: spawn, wait until healthy, stop, and never lose track of it.

The child runs in its own session, so it leads a process group; signals go to the whole group and
therefore reach the workers a server forks (vLLM's engine processes, a shell wrapper's children).
Output goes to an append-only log file whose tail explains a failed start.

The caller owns ``stop()``: in the proxy that is the GPU slot, which also serialises ``start()`` and
``stop()`` so only one task drives a ``ManagedProcess`` at a time. Emergency paths that cannot await
(atexit, a lifespan that failed half-way) use ``kill_now()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import shlex
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from subprocess import DEVNULL, STDOUT

import httpx

from imageworks.backends.procfs import process_start_ticks

logger = logging.getLogger(__name__)

_CONNECT_PROBE_S = 0.5  # a listener on loopback answers a connect at once
_HEALTH_REQUEST_MAX_S = 1.0  # a slow probe must not eat the whole start budget
_KILL_WAIT_S = 5.0  # after SIGKILL only an uninterruptible (D-state) process takes longer
_PORT_RELEASE_S = 5.0
_FAILED_START_STOP_S = 5.0  # a server that never came up has no work worth a long grace period
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


class StartError(Exception):
    """The server did not become ready; ``reason`` says why, ``log_tail`` shows its last words."""

    def __init__(self, reason: str, log_tail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.log_tail = log_tail

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


class ManagedProcess:
    """One server process in its own process group. Not safe for concurrent start()/stop()."""

    def __init__(self, spec: LaunchSpec) -> None:
        self.spec = spec
        self._state = ProcessState.STOPPED
        self._process: asyncio.subprocess.Process | None = None
        self._started_at: float | None = None
        # False once the group has been swept after its leader exited: from then on the pgid may
        # be reused by an unrelated process group, so we must never signal it again.
        self._group_open = False

    @property
    def state(self) -> ProcessState:
        return self._state

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def started_at(self) -> float | None:
        """Wall-clock (epoch) time of the spawn."""
        return self._started_at

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process else None

    def is_alive(self) -> bool:
        # The kernel knows at once (a killed child is a zombie until reaped); asyncio's
        # returncode only once its child watcher has run, which can be after the next request.
        process = self._process
        return (
            process is not None
            and process.returncode is None
            and process_start_ticks(process.pid) is not None
        )

    async def start(self, timeout_s: float, *, poll_interval_s: float = 0.1) -> None:
        """Spawn the server and return once it answers a health path; raise StartError otherwise.

        Blocks until ready, until the process exits (at once, not at the timeout) or until
        timeout_s. On any failure, cancellation included, the process group is killed.
        """
        if self._state not in (ProcessState.STOPPED, ProcessState.FAILED) or self.is_alive():
            raise RuntimeError(
                f"{self.spec.name}: start() while {self._state.value}; stop() it first"
            )
        self._state = ProcessState.STARTING
        try:
            await self._launch(timeout_s, poll_interval_s)
            self._state = ProcessState.READY
        finally:
            if self._state is ProcessState.STARTING:
                self.kill_now()
                self._state = ProcessState.FAILED

    async def stop(self, timeout_s: float) -> None:
        """SIGTERM the group, SIGKILL it after timeout_s, then wait (bounded) for the port to free.

        Idempotent, and fine if the process already died. A process that survives even SIGKILL
        (stuck in the kernel) leaves the state FAILED and is logged; stop() does not raise.
        """
        if self._state in (ProcessState.STARTING, ProcessState.STOPPING):
            raise RuntimeError(f"{self.spec.name}: stop() while {self._state.value}")
        if self._state is ProcessState.STOPPED:
            return
        self._state = ProcessState.STOPPING
        try:
            gone = await self._terminate(timeout_s)
            if gone and self._process is not None:
                await self._wait_port_released()
            self._state = ProcessState.STOPPED if gone else ProcessState.FAILED
        finally:
            if self._state is ProcessState.STOPPING:  # cancelled: do not leave it running
                self.kill_now()
                self._state = ProcessState.FAILED

    def kill_now(self) -> None:
        """SIGKILL the whole process group without awaiting; for cleanup paths that cannot await."""
        self._signal_group(signal.SIGKILL)
        if self._process is not None and self._process.returncode is not None:
            self._group_open = False

    def log_tail(self, lines: int = 20) -> str:
        """The last `lines` lines of the log, read backwards from the end (logs grow large)."""
        if lines <= 0:
            return ""
        data = b""
        try:
            with self.spec.log_path.open("rb") as log:
                position = log.seek(0, os.SEEK_END)
                while position > 0 and data.count(b"\n") <= lines and len(data) < _TAIL_MAX_BYTES:
                    step = min(_TAIL_BLOCK, position)
                    position -= step
                    log.seek(position)
                    data = log.read(step) + data
        except FileNotFoundError:
            return ""
        return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])

    async def _launch(self, timeout_s: float, poll_interval_s: float) -> None:
        spec = self.spec
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        self.kill_now()  # sweeps what a previous, cancelled launch may have left in its group
        self._process, self._started_at, self._group_open = None, None, False
        if await port_in_use(spec.host, spec.port):
            raise StartError(
                f"{spec.name}: port {spec.port} is already in use on {spec.host}; "
                "another server is listening there (a leftover model server?)"
            )
        try:
            spec.log_path.parent.mkdir(parents=True, exist_ok=True)
            # The header makes every tail self-explaining: which launch, when, with what argv.
            self._note(f"starting {spec.name}: {shlex.join(spec.argv)}")
            # The child gets its own copy of the descriptor, so ours can close right away.
            with spec.log_path.open("ab") as log:
                self._process = await asyncio.create_subprocess_exec(
                    *spec.argv,
                    stdin=DEVNULL,
                    stdout=log,
                    stderr=STDOUT,
                    start_new_session=True,
                    env={**os.environ, **spec.env},
                    cwd=spec.cwd,
                )
        except OSError as error:
            raise StartError(f"{spec.name}: could not launch: {error}", self.log_tail()) from error
        self._started_at = time.time()
        self._group_open = True
        process = self._process

        exited = asyncio.create_task(process.wait())
        healthy = asyncio.create_task(self._poll_health(deadline, poll_interval_s))
        try:
            await asyncio.wait(
                {exited, healthy},
                timeout=max(0.0, deadline - loop.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            exited.cancel()
            healthy.cancel()
            await asyncio.gather(exited, healthy, return_exceptions=True)
        if exited.done() and not exited.cancelled():
            raise StartError(
                f"{spec.name}: {_describe_exit(exited.result())} while starting "
                f"(log: {spec.log_path})",
                self.log_tail(),
            )
        if healthy.done() and not healthy.cancelled():
            healthy.result()  # surfaces a bug in the poll instead of calling it ready
            return
        await self._terminate(_FAILED_START_STOP_S)
        raise StartError(
            f"{spec.name}: did not become ready within {timeout_s:g} s (log: {spec.log_path})",
            self.log_tail(),
        )

    async def _poll_health(self, deadline: float, poll_interval_s: float) -> None:
        """Return once any health path answers 2xx; paths are tried in order each round."""
        loop = asyncio.get_running_loop()
        base = f"http://{self.spec.host}:{self.spec.port}"
        # trust_env=False: an HTTP(S)_PROXY in the environment must not capture loopback probes.
        async with httpx.AsyncClient(trust_env=False) as client:
            while True:
                for path in self.spec.health_paths:
                    budget = min(_HEALTH_REQUEST_MAX_S, max(deadline - loop.time(), 0.01))
                    try:
                        response = await client.get(base + path, timeout=budget)
                    except httpx.HTTPError:
                        continue  # not listening yet, or this path hangs: try the next one
                    if response.is_success:
                        return
                await asyncio.sleep(poll_interval_s)

    async def _terminate(self, timeout_s: float) -> bool:
        """Bring the group down; True once the leader is reaped. State is the caller's business."""
        process = self._process
        if process is None:
            return True
        if process.returncode is None:
            self._signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout_s)
            except TimeoutError:
                # Needed in practice: llama_cpp.server finishes an in-flight generation on SIGTERM.
                self._note(f"still running {timeout_s:g} s after SIGTERM; sending SIGKILL")
                logger.warning("%s: escalating to SIGKILL (pid %d)", self.spec.name, process.pid)
                self._signal_group(signal.SIGKILL)
                try:
                    await asyncio.wait_for(process.wait(), _KILL_WAIT_S)
                except TimeoutError:
                    logger.error("%s: pid %d survived SIGKILL", self.spec.name, process.pid)
                    return False
        # The leader waits for the workers it cares about; whatever it left behind is an orphan.
        self.kill_now()
        return True

    async def _wait_port_released(self) -> None:
        try:
            await wait_port_free(self.spec.host, self.spec.port, _PORT_RELEASE_S)
        except TimeoutError:
            # Our group is gone, so someone else holds the port; the next start() will say so.
            logger.warning("%s: port %d still in use after stop", self.spec.name, self.spec.port)

    def _signal_group(self, sig: signal.Signals) -> None:
        if self._process is None or not self._group_open:
            return
        # start_new_session made the child a group leader, so its pid is the group id.
        with contextlib.suppress(ProcessLookupError):  # the whole group has already exited
            os.killpg(self._process.pid, sig)

    def _note(self, message: str) -> None:
        """Append a supervisor line to the log; best effort, the operator log gets it too."""
        stamp = datetime.now().astimezone().isoformat(timespec="seconds")
        line = f"\n===== {stamp} imageworks supervisor: {message}\n"
        try:
            with self.spec.log_path.open("a", encoding="utf-8") as log:
                log.write(line)
        except OSError as error:
            logger.warning("%s: cannot write log %s: %s", self.spec.name, self.spec.log_path, error)


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"
