"""Version locks: hash an entry's weights and compare them with the digest recorded in the registry.

Pure logic plus streaming file hashing. Recording a lock is the store's job; this module only
returns the JSON patches to deep-merge into the registry.
"""

from __future__ import annotations

import enum
import hashlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, TextIO

from imageworks.registry.errors import RegistryError
from imageworks.registry.paths import weights_path
from imageworks.registry.schema import RegistryEntry

CHUNK_SIZE = 1024 * 1024  # big enough to keep syscalls cheap, small enough to report progress


def weight_files(entry: RegistryEntry, base_dir: Path) -> list[tuple[str, Path]]:
    """The files whose bytes define the model, as (relative POSIX path, absolute path) pairs."""
    root = weights_path(entry, base_dir)
    if root is None:
        raise RegistryError(f"{entry.name}: no local weights to hash (served by its backend)")
    if not root.exists():
        raise RegistryError(f"{entry.name}: weights not found at {root}")
    if root.is_file():
        return [(root.name, root)]
    if entry.download_files:
        # The downloader recorded exactly which files make up the model; anything else in the
        # directory (notes, partial downloads) must not change the digest.
        found: dict[str, Path] = {}
        for raw in entry.download_files:
            rel = PurePosixPath(raw).as_posix()
            path = root / rel
            if not path.is_file():
                raise RegistryError(f"{entry.name}: listed weight file {rel!r} missing in {root}")
            found[rel] = path
        return sorted(found.items())
    files: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Hidden entries are tool state (`.cache/` from huggingface_hub, `.git/`), not weights.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            path = Path(dirpath, filename)
            # is_file() follows symlinks: Hugging Face snapshots are symlinks into a blob store.
            if not filename.startswith(".") and path.is_file():
                files.append((path.relative_to(root).as_posix(), path))
    return sorted(files)


def hash_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """The sha256 hex digest of `path`, read in chunks so multi-GB weights never sit in memory."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_SIZE)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as stream:
        while n := stream.readinto(buffer):
            digest.update(view[:n])
            if on_bytes is not None:
                on_bytes(n)
    return digest.hexdigest()


class Progress(Protocol):
    """Receives hashing progress; see TerminalProgress."""

    def start(self, label: str, total_bytes: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def finish(self) -> None: ...


class TerminalProgress:
    """A one-line bar on a terminal. Silent when the stream is not a TTY, so logs and pipes stay
    free of carriage-return noise."""

    def __init__(
        self, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._enabled = self._stream.isatty()
        self._clock = clock
        self._label = ""
        self._total = 0
        self._done = 0
        self._last_draw = float("-inf")

    def start(self, label: str, total_bytes: int) -> None:
        self._label, self._total, self._done = label, total_bytes, 0
        self._last_draw = float("-inf")
        self._draw()

    def advance(self, n: int) -> None:
        self._done += n
        # At most ~10 redraws a second: one per 1 MiB chunk would flood a slow terminal.
        if self._clock() - self._last_draw >= 0.1:
            self._draw()

    def finish(self) -> None:
        self._draw()
        if self._enabled:
            self._stream.write("\n")
            self._stream.flush()

    def _draw(self) -> None:
        self._last_draw = self._clock()
        if not self._enabled:
            return
        percent = 100 * self._done // self._total if self._total else 100
        line = f"hashing {self._label}  {percent:3d}%  {_sizes(self._done, self._total)}"
        self._stream.write("\r" + line)
        self._stream.flush()


def _sizes(done: int, total: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if total >= scale:
            return f"{done / scale:.1f}/{total / scale:.1f} {unit}"
    return f"{done}/{total} B"


@dataclass(frozen=True)
class Digest:
    aggregate_sha256: str
    files: tuple[tuple[str, str], ...]  # (relative path, sha256), in relative-path order
    total_bytes: int


def compute_digest(
    files: Sequence[tuple[str, Path]], progress: Progress | None = None, *, label: str = "weights"
) -> Digest:
    """Hash every file and combine them into one aggregate digest."""
    ordered = sorted(files)
    hashed: list[tuple[str, str]] = []
    total_bytes = 0

    def count(n: int) -> None:
        nonlocal total_bytes
        total_bytes += n
        if progress is not None:
            progress.advance(n)

    try:
        if progress is not None:
            progress.start(label, sum(path.stat().st_size for _, path in ordered))
        for rel, path in ordered:
            hashed.append((rel, hash_file(path, count)))
    except OSError as exc:
        raise RegistryError(f"{label}: cannot read weights: {exc}") from exc
    finally:
        if progress is not None:
            progress.finish()
    # The aggregate is the sha256 of `sha256sum`-style lines ("<sha>  <path>\n"), so a user can
    # reproduce it by hand: `sha256sum <files in path order> | sha256sum` from the weights root.
    listing = "".join(f"{sha}  {rel}\n" for rel, sha in hashed)
    aggregate = hashlib.sha256(listing.encode("utf-8")).hexdigest()
    return Digest(aggregate_sha256=aggregate, files=tuple(hashed), total_bytes=total_bytes)


class VerifyStatus(enum.Enum):
    OK = "ok"  # the weights match the lock
    CHANGED = "changed"  # the weights differ from version_lock.expected_aggregate_sha256
    UNLOCKED = "unlocked"  # no expectation recorded


@dataclass(frozen=True)
class VerifyResult:
    name: str
    status: VerifyStatus
    expected: str | None
    digest: Digest


def verify_entry(
    entry: RegistryEntry, base_dir: Path, progress: Progress | None = None
) -> VerifyResult:
    """Hash the entry's weights and compare them with its version lock."""
    digest = compute_digest(weight_files(entry, base_dir), progress, label=entry.name)
    lock = entry.version_lock
    # An unlocked entry keeps its old digest on record, but it is no longer an expectation:
    # unlocking is how a user says "these weights may change".
    expected = (lock.expected_aggregate_sha256 or "").strip().lower() or None
    if not lock.locked or expected is None:
        return VerifyResult(entry.name, VerifyStatus.UNLOCKED, None, digest)
    status = VerifyStatus.OK if digest.aggregate_sha256 == expected else VerifyStatus.CHANGED
    return VerifyResult(entry.name, status, expected, digest)


def _timestamp(now: datetime) -> str:
    # A naive `now` is taken as local time (Python's convention), then expressed in UTC.
    return now.astimezone(UTC).isoformat(timespec="seconds")


def lock_patch(digest: Digest, now: datetime) -> dict[str, Any]:
    """Lock the entry to `digest` and record the per-file hashes behind it."""
    return {
        "version_lock": {
            "locked": True,
            "expected_aggregate_sha256": digest.aggregate_sha256,
            "last_verified": _timestamp(now),
        },
        "artifacts": {
            "aggregate_sha256": digest.aggregate_sha256,
            "files": [{"path": rel, "sha256": sha} for rel, sha in digest.files],
        },
    }


def verified_patch(now: datetime) -> dict[str, Any]:
    return {"version_lock": {"last_verified": _timestamp(now)}}


def unlock_patch() -> dict[str, Any]:
    # The old expectation stays on record (useful history); `locked: False` is what disables it.
    return {"version_lock": {"locked": False}}
