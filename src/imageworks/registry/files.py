"""Reading and writing registry JSON files safely.

Several processes write the registry (the loader CLI, the proxy, download tools), so every write is
a read-modify-write under one inter-process lock, and every file is replaced atomically: a reader
sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from imageworks.registry.errors import RegistryError

LOCK_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class FileSignature:
    """What we compare to notice that a file changed: modification time and size."""

    mtime_ns: int
    size: int

    @classmethod
    def of(cls, path: Path) -> FileSignature | None:
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        return cls(stat.st_mtime_ns, stat.st_size)


def read_json_list(path: Path) -> list[Any]:
    """The JSON list in `path`; a clear error naming the file (and line) when it is not one."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read registry file: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from exc
    if not isinstance(data, list):
        raise RegistryError(
            f"{path}: a registry file must hold a JSON list of entries, not {type(data).__name__}"
        )
    return data


def dump_json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


@contextlib.contextmanager
def exclusive_lock(lock_path: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the registry's inter-process lock; give up with a clear error after `timeout_s`."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path), timeout=timeout_s)
    try:
        lock.acquire()
    except Timeout as exc:
        raise RegistryError(
            f"{lock_path}: another process has held the registry lock for over {timeout_s:.0f}s"
        ) from exc
    try:
        yield
    finally:
        lock.release()
