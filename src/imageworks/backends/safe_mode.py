"""Which model server programs must run in safe mode on this machine, remembered across runs.

Some builds crash while they load a model on some CPUs: llama.cpp's weight repacking (its AMX
kernels above all, on Intel CPUs in VMs), vLLM's CUDA-graph capture. A start that dies from a
crash signal before it is healthy is retried once with the launcher's safe-mode arguments
(`LaunchSpec.safe_mode_args`); when that one comes up, the program is remembered here, so every
later start of it (any entry, any swap, the next proxy, the next test) goes straight to safe
mode instead of crashing first.

A program is known by its path, size and modification time: a rebuilt or upgraded binary is a
new program and is tried afresh. The memory is a small JSON file in the user's cache
(`$XDG_CACHE_HOME/imageworks/safe-mode.json`, else `~/.cache/...`), written atomically; a file
that cannot be read or written costs only the memory (a warning, then a retry each time), never
a start.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from imageworks.backends.supervisor import LaunchSpec
from imageworks.registry.files import write_atomic

log = logging.getLogger(__name__)

SafeModePolicy = Literal["auto", "always", "off"]
FILE_NAME = "safe-mode.json"


def default_memory_path(environ: Mapping[str, str] = os.environ) -> Path:
    cache = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "imageworks" / FILE_NAME


def program_identity(spec: LaunchSpec) -> str | None:
    """The program a launch runs, as `path|size|mtime_ns|rest of its prefix`; None if it
    cannot be found (its start will fail and say so). For `python -m vllm...` the interpreter
    is the file, and the module named after it part of the key."""
    if not spec.argv:
        return None
    found = shutil.which(spec.argv[0])
    if found is None:
        return None
    path = Path(found).resolve()
    try:
        stat = path.stat()
    except OSError:
        return None
    module = spec.argv[2] if len(spec.argv) > 2 and spec.argv[1] == "-m" else ""
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{module}"


@dataclass(frozen=True, slots=True)
class Remembered:
    """Why a program runs in safe mode here: the arguments, the crash, and since when."""

    args: tuple[str, ...]
    reason: str
    since: str  # ISO 8601, UTC


class SafeModeMemory:
    """The programs that need safe mode here. Reads and writes are small and rare (a start),
    done by the caller off the event loop; a lock keeps two threads from interleaving."""

    def __init__(self, path: Path | None, policy: SafeModePolicy = "auto") -> None:
        self.path = path  # None: remember for this process only
        self.policy: SafeModePolicy = policy
        self._lock = threading.Lock()
        self._in_memory: dict[str, Remembered] = {}

    @property
    def retries(self) -> bool:
        """Whether a crash at load is retried in safe mode (CHAT_PROXY_SAFE_MODE is not off)."""
        return self.policy != "off"

    def recall(self, spec: LaunchSpec) -> Remembered | None:
        """Whether `spec` should start in safe mode: always (policy), never (policy or no
        safe-mode arguments), or if its program crashed here before."""
        if not spec.safe_mode_args or self.policy == "off":
            return None
        if self.policy == "always":
            return Remembered(spec.safe_mode_args, "CHAT_PROXY_SAFE_MODE=always", "")
        identity = program_identity(spec)
        if identity is None:
            return None
        with self._lock:
            return self._load().get(identity)

    def remember(self, spec: LaunchSpec, reason: str) -> None:
        """`spec`'s program crashed at load and came up in safe mode: keep it there."""
        identity = program_identity(spec)
        if identity is None or self.policy != "auto":
            return
        since = datetime.now(UTC).isoformat(timespec="seconds")
        with self._lock:
            known = self._load()
            known[identity] = Remembered(spec.safe_mode_args, reason, since)
            self._in_memory = known
            if self.path is None:
                return
            document = {
                key: {"args": list(value.args), "reason": value.reason, "since": value.since}
                for key, value in known.items()
            }
            try:
                write_atomic(self.path, json.dumps(document, indent=2) + "\n")
            except OSError as exc:
                log.warning("cannot remember safe mode in %s: %s", self.path, exc)

    def _load(self) -> dict[str, Remembered]:
        if self.path is None:
            return dict(self._in_memory)
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return dict(self._in_memory)
        except (OSError, ValueError) as exc:
            log.warning("ignoring the safe-mode memory %s: %s", self.path, exc)
            return dict(self._in_memory)
        known = dict(self._in_memory)
        if isinstance(document, dict):
            for key, value in document.items():
                remembered = _parse(value)
                if isinstance(key, str) and remembered is not None:
                    known[key] = remembered
        return known


def _parse(value: object) -> Remembered | None:
    if not isinstance(value, dict):
        return None
    args, reason, since = value.get("args"), value.get("reason"), value.get("since")
    if not (isinstance(args, list) and args and all(isinstance(a, str) for a in args)):
        return None
    return Remembered(tuple(args), str(reason or ""), str(since or ""))
