"""The state file: the shared truth about the one model server process on the managed port.

The proxy and the ``imageworks-loader`` CLI may run as separate processes, so what each knows in
memory is not enough: a restarted proxy, or ``current-model`` after ``activate-model``, must find
the server another process started and adopt it instead of orphaning it. Every change happens
under ``StateFile.locked()``, an inter-process lock with a bounded wait.

A recorded process counts as alive only if its pid exists, is not a zombie, and started at the
recorded time (``/proc/<pid>/stat`` field 22): pids are reused, and a stale record must never make
us signal a stranger. ``recorded_process`` gives the ``ServerProcess`` to check or stop it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

from imageworks.backends.procfs import is_same_process
from imageworks.backends.supervisor import LaunchSpec, ServerProcess
from imageworks.registry.errors import RegistryError
from imageworks.registry.files import dump_json, exclusive_lock, write_atomic

logger = logging.getLogger(__name__)

OWNERS = ("proxy", "loader")
# A record is written the moment the process is spawned (starting), updated once it answers its
# health check (ready), and marked before it is signalled (stopping): a crash at any moment
# leaves a record that says what the next proxy must do with the process.
PHASES = ("starting", "ready", "stopping")


@dataclass(frozen=True, slots=True)
class ManagedState:
    """One record of the state file. Invalid values raise ValueError at construction."""

    entry: str
    served_model_id: str
    backend: str
    port: int
    pid: int
    process_start: int  # start time in clock ticks since boot, /proc/<pid>/stat field 22
    command: list[str]
    started_at: str  # ISO 8601 with a UTC offset
    log_path: str
    owner: str  # "proxy" or "loader": who started the process
    phase: str = "ready"  # one of PHASES (records written before phases existed were ready)
    # The safe-mode arguments it was started with, at the end of `command` (it crashed at load
    # without them, or its binary is known to); empty: a normal start.
    safe_mode: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        text = (self.entry, self.served_model_id, self.backend, self.started_at, self.log_path)
        if not all(isinstance(value, str) and value for value in text):
            raise ValueError("entry, served_model_id, backend, started_at, log_path must be set")
        numbers = (self.port, self.pid, self.process_start)
        if not all(type(value) is int for value in numbers) or not (
            0 < self.port < 65536 and self.pid > 0 and self.process_start >= 0
        ):
            raise ValueError(f"invalid port {self.port!r}, pid {self.pid!r} or process_start")
        command = self.command
        if not (isinstance(command, list) and command and all(type(a) is str for a in command)):
            raise ValueError(f"command must be a non-empty list of strings, not {command!r}")
        if self.owner not in OWNERS:
            raise ValueError(f"owner must be one of {OWNERS}, not {self.owner!r}")
        safe = self.safe_mode
        if not (isinstance(safe, list) and all(type(a) is str for a in safe)) or (
            safe and command[len(command) - len(safe) :] != safe
        ):
            raise ValueError(f"safe_mode must be the strings that end the command, not {safe!r}")
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, not {self.phase!r}")
        if datetime.fromisoformat(self.started_at).tzinfo is None:
            raise ValueError(f"started_at {self.started_at!r} has no UTC offset")

    @property
    def requested_command(self) -> tuple[str, ...]:
        """The command as the entry asked for it, without the safe-mode arguments."""
        return tuple(self.command[: len(self.command) - len(self.safe_mode)])

    def to_json(self) -> str:
        return dump_json(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ManagedState:
        """Parse a record; ValueError saying what is wrong if it is not a valid one.

        Unknown keys are ignored, so an older reader accepts a newer writer's record.
        """
        data = json.loads(text)  # JSONDecodeError is a ValueError
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, not {type(data).__name__}")
        names = [item.name for item in fields(cls)]
        optional = ("phase", "safe_mode")  # added after the first records were written
        missing = [name for name in names if name not in data and name not in optional]
        if missing:
            raise ValueError(f"missing fields: {', '.join(missing)}")
        return cls(**{name: data[name] for name in names if name in data})


class StateLockTimeout(TimeoutError):
    """Another process held the state file's lock for longer than the timeout."""


class StateFile:
    """The state file at `path` and its lock `<path>.lock`.

    ``locked()`` is not re-entrant and blocks the calling thread; hold it only briefly.
    """

    def __init__(self, path: Path, *, lock_timeout_s: float = 10.0) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self._lock_timeout_s = lock_timeout_s

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the exclusive inter-process lock; StateLockTimeout after `lock_timeout_s`."""
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(exclusive_lock(self.lock_path, self._lock_timeout_s))
            except RegistryError as exc:
                raise StateLockTimeout(
                    f"{self.lock_path}: the model server state lock has been held elsewhere "
                    f"(by the chat proxy or imageworks-loader) for over {self._lock_timeout_s:g} s"
                ) from exc
            yield

    def read(self) -> ManagedState | None:
        """The record, or None if there is none. A corrupt file is moved aside and logged."""
        try:
            with self.path.open("rb") as handle:
                identity = _identity(os.fstat(handle.fileno()))
                raw = handle.read()
        except FileNotFoundError:
            return None
        try:
            return ManagedState.from_json(raw.decode("utf-8"))
        except ValueError as exc:
            reason = str(exc)
        with contextlib.suppress(FileNotFoundError):
            if _identity(self.path.stat()) != identity:
                return self.read()  # replaced while we read: never move a newer file aside
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
            os.rename(self.path, aside)
            logger.warning("%s: invalid state file (%s); moved it to %s", self.path, reason, aside)
        return None

    def write(self, state: ManagedState) -> None:
        """Replace the record atomically (temporary file + rename), creating the directory."""
        write_atomic(self.path, state.to_json())

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def live(self) -> ManagedState | None:
        """The record if its process is still the same live process; else clear it. Callers hold
        ``locked()``."""
        state = self.read()
        if state is None or is_same_process(state.pid, state.process_start):
            return state
        logger.info("%s: %s (pid %d) has exited; record cleared", self.path, state.entry, state.pid)
        self.clear()
        return None


def _identity(stat: os.stat_result) -> tuple[int, int, int]:
    return stat.st_dev, stat.st_ino, stat.st_mtime_ns


def recorded_process(state: ManagedState, host: str = "127.0.0.1") -> ServerProcess:
    """The server a record describes, to check, adopt or stop (it is not our child: liveness and
    every signal go through the pid + start-time check)."""
    spec = LaunchSpec(
        name=state.entry,
        argv=tuple(state.command),
        port=state.port,
        log_path=Path(state.log_path),
        host=host,
        safe_mode_args=tuple(state.safe_mode),
        safe_mode=bool(state.safe_mode),
    )
    return ServerProcess(spec, state.pid, state.process_start)
