"""Start an external backend's server on demand when a request finds it down.

For ``external`` registry entries the user may map the entry name to a command that brings the
server up. ``ensure_up`` probes ``{base_url}/models``; when nothing answers it runs the command
once (concurrent callers share one attempt per entry), polls until the server answers, the
process exits or the grace period ends, and keeps the process tracked until ``close()``.

Each command runs as a ``ManagedProcess`` (own process group, log file, SIGTERM then SIGKILL),
health-checked on the host, port and path of the target's base URL.
"""

from __future__ import annotations

import asyncio
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from imageworks.backends.base import BackendNotReady, Target
from imageworks.backends.supervisor import LaunchSpec, ManagedProcess, ProcessState, StartError

_POLL_S = 0.25
_PROBE_TIMEOUT_S = 2.0  # one health probe; a server that is up answers /models at once
_UNSAFE_FILENAME = re.compile(r"[^\w.()@+-]+")


def command_argv(command: Sequence[str] | str) -> tuple[str, ...]:
    """An argv list is used as is; a string is split like a shell would, but never run by one."""
    argv = tuple(shlex.split(command)) if isinstance(command, str) else tuple(command)
    if not argv:
        raise ValueError("empty command")
    return argv


class Autostarter:
    """Starts, tracks and stops the autostart processes of external entries (one per entry)."""

    def __init__(
        self,
        commands: Mapping[str, Sequence[str] | str],
        *,
        grace_period_s: float,
        client: httpx.AsyncClient,
        log_dir: Path,
        stop_timeout_s: float = 10.0,
    ) -> None:
        self._commands: dict[str, tuple[str, ...]] = {}
        for name, command in commands.items():
            try:
                self._commands[name] = command_argv(command)
            except ValueError as error:  # bad quoting or empty: a config error, say so at startup
                raise ValueError(f"autostart command for {name!r}: {error}") from error
        self._grace_period_s = grace_period_s
        self._client = client
        self._log_dir = log_dir / "autostart"
        self._stop_timeout_s = stop_timeout_s
        self._attempts: dict[str, asyncio.Task[None]] = {}
        self._processes: dict[str, ManagedProcess] = {}  # starting or started, one per entry
        self._closed = False

    def has_command(self, entry_name: str) -> bool:
        return entry_name in self._commands

    async def ensure_up(self, entry_name: str, target: Target) -> None:
        """Return once the target answers; start its command if it does not. Raises
        BackendNotReady when it is down and cannot be brought up."""
        if await self._answers(target):
            return
        argv = self._commands.get(entry_name)
        if argv is None:
            raise BackendNotReady(f"{target.label} is down and has no autostart command")
        if self._closed:
            raise BackendNotReady(f"{target.label} is down and the proxy is shutting down")
        attempt = self._attempts.get(entry_name)
        if attempt is None:
            attempt = asyncio.create_task(self._bring_up(entry_name, argv, target))
            self._attempts[entry_name] = attempt
        # A waiter that gives up (client disconnect) must not cancel the others' shared attempt.
        try:
            await asyncio.shield(attempt)
        except asyncio.CancelledError:
            waiter = asyncio.current_task()
            if attempt.cancelled() and waiter is not None and not waiter.cancelling():
                raise BackendNotReady(f"{target.label}: autostart cancelled by shutdown") from None
            raise

    async def close(self) -> None:
        """Cancel attempts in flight and stop every process we started; each stop is bounded."""
        self._closed = True
        attempts = list(self._attempts.values())
        for attempt in attempts:
            attempt.cancel()
        await asyncio.gather(*attempts, return_exceptions=True)
        processes = list(self._processes.values())
        self._processes.clear()
        await asyncio.gather(*(process.stop(self._stop_timeout_s) for process in processes))

    def status(self) -> dict[str, Any]:
        """Entry name → pid, state and spawn time (epoch seconds) of its process."""
        report: dict[str, Any] = {}
        for name, process in self._processes.items():
            state = process.state.value
            if process.state is ProcessState.READY and not process.is_alive():
                state = f"exited ({process.returncode})"
            report[name] = {"pid": process.pid, "state": state, "started_at": process.started_at}
        return report

    async def _bring_up(self, name: str, argv: tuple[str, ...], target: Target) -> None:
        try:
            current = self._processes.get(name)
            if current is not None:
                # Ours and still running: give it the grace period rather than start a second one.
                if await self._answers_within_grace(current, target):
                    return
                del self._processes[name]
                hung = current.is_alive()
                await current.stop(self._stop_timeout_s)  # reaps an exited one, stops a hung one
                if hung:
                    raise BackendNotReady(
                        f"{target.label}: autostarted pid {current.pid} did not answer within "
                        f"{self._grace_period_s:g} s; stopped it (log: {current.spec.log_path})"
                    )
            await self._spawn(name, argv, target)
        finally:
            self._attempts.pop(name, None)  # a failed attempt is forgotten; the next one retries

    async def _spawn(self, name: str, argv: tuple[str, ...], target: Target) -> None:
        process = ManagedProcess(self._launch_spec(name, argv, target))
        self._processes[name] = process
        try:
            await process.start(self._grace_period_s, poll_interval_s=_POLL_S)
        except StartError as error:
            raise BackendNotReady(f"{target.label}: autostart failed: {error}") from error
        finally:
            if process.state is not ProcessState.READY:
                self._processes.pop(name, None)
                await process.stop(self._stop_timeout_s)  # start() killed it; this reaps it

    def _launch_spec(self, name: str, argv: tuple[str, ...], target: Target) -> LaunchSpec:
        url = urlsplit(target.base_url.rstrip("/"))
        if url.scheme != "http" or not url.hostname:
            raise BackendNotReady(
                f"{target.label}: autostart needs a plain http:// base URL, not {target.base_url}"
            )
        safe_name = _UNSAFE_FILENAME.sub("_", name)
        return LaunchSpec(
            name=f"autostart:{name}",
            argv=argv,
            host=url.hostname,
            port=url.port or 80,
            log_path=self._log_dir / f"{safe_name}.log",
            health_paths=(f"{url.path}/models",),
        )

    async def _answers_within_grace(self, process: ManagedProcess, target: Target) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._grace_period_s
        while process.is_alive():
            if await self._answers(target):
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(_POLL_S)
        return False

    async def _answers(self, target: Target) -> bool:
        """True when `{base_url}/models` gets any answer below 500 (401/404 still mean "up")."""
        url = f"{target.base_url.rstrip('/')}/models"
        try:
            response = await self._client.get(url, timeout=_PROBE_TIMEOUT_S)
        except httpx.HTTPError:
            return False
        return response.status_code < 500
