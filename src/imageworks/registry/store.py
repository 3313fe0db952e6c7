"""The layered registry on disk.

    <dir>/model_registry.curated.json      hand-edited; tools never rewrite it
    <dir>/model_registry.discovered.json   written by tools (locks, downloads, imports)
    <dir>/model_registry.json              the merged view, regenerated from the two layers

A directory with only `model_registry.json` is a single-file registry: it is read as it is and
tools write to it directly. Loading never writes anything; `refresh_merged_file`, `update_entry`
and `rewrite_discovered` (discovery's) are the only writers, all under one inter-process lock.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from imageworks.registry.errors import EntryNotFound, RegistryError
from imageworks.registry.files import (
    FileSignature,
    dump_json,
    exclusive_lock,
    read_json_list,
    write_atomic,
)
from imageworks.registry.layers import (
    RawEntry,
    apply_patch,
    index_by_name,
    leaves,
    lookup,
    merge_layers,
)
from imageworks.registry.schema import RegistryEntry

log = logging.getLogger("imageworks.registry")

CURATED_FILE = "model_registry.curated.json"
DISCOVERED_FILE = "model_registry.discovered.json"
MERGED_FILE = "model_registry.json"
LOCK_FILE = ".model_registry.lock"


@dataclass(frozen=True)
class RegistrySnapshot:
    """One consistent reading of the registry. Entries are sorted by name."""

    directory: Path
    layered: bool
    entries: tuple[RegistryEntry, ...]
    raw: Mapping[str, RawEntry]  # merged JSON of every valid entry, as the files spell it
    sources: Mapping[str, tuple[Path, ...]]  # name -> the files that define it
    warnings: tuple[str, ...] = ()
    _by_name: dict[str, RegistryEntry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {entry.name: entry for entry in self.entries})

    def get(self, name: str) -> RegistryEntry | None:
        return self._by_name.get(name)

    def __len__(self) -> int:
        return len(self.entries)


class RegistryStore:
    """Reads the registry directory, caching the result until a layer file changes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.curated_path = directory / CURATED_FILE
        self.discovered_path = directory / DISCOVERED_FILE
        self.merged_path = directory / MERGED_FILE
        self.lock_path = directory / LOCK_FILE
        self._cache: tuple[tuple[FileSignature | None, ...], RegistrySnapshot] | None = None
        self._reload_lock = threading.Lock()

    # -- reading -------------------------------------------------------------------------------

    def is_layered(self) -> bool:
        return self.curated_path.exists() or self.discovered_path.exists()

    def _signature(self) -> tuple[FileSignature | None, ...]:
        paths = (self.curated_path, self.discovered_path, self.merged_path)
        return tuple(FileSignature.of(path) for path in paths)

    def load(self) -> RegistrySnapshot:
        """The current registry; re-read only when a file's mtime or size changed.

        Blocking (file I/O): async callers run it in a thread."""
        with self._reload_lock:
            signature = self._signature()
            if self._cache is not None and self._cache[0] == signature:
                return self._cache[1]
            snapshot = self._read()
            self._cache = (signature, snapshot)
            for warning in snapshot.warnings:
                log.warning("%s", warning)
            return snapshot

    def _read_layers(self, warnings: list[str]) -> dict[Path, dict[str, RawEntry]]:
        """Each existing layer file, indexed by entry name (the single file in that mode)."""
        paths = (
            (self.curated_path, self.discovered_path) if self.is_layered() else (self.merged_path,)
        )
        if not any(path.exists() for path in paths):
            raise RegistryError(
                f"{self.directory}: no registry files (expected {CURATED_FILE}, "
                f"{DISCOVERED_FILE} or {MERGED_FILE})"
            )
        return {
            path: index_by_name(read_json_list(path), str(path), warnings)
            for path in paths
            if path.exists()
        }

    def _read(self) -> RegistrySnapshot:
        warnings: list[str] = []
        return self._build(self._read_layers(warnings), warnings)

    def _build(
        self, layers: dict[Path, dict[str, RawEntry]], warnings: list[str]
    ) -> RegistrySnapshot:
        """Merge the layers and validate every entry, skipping (with a warning) invalid ones."""
        if self.is_layered():
            merged = merge_layers(
                layers.get(self.curated_path, {}), layers.get(self.discovered_path, {})
            )
        else:
            merged = dict(sorted(layers[self.merged_path].items()))

        entries: list[RegistryEntry] = []
        raw: dict[str, RawEntry] = {}
        sources: dict[str, tuple[Path, ...]] = {}
        for name, data in merged.items():
            defined_in = tuple(path for path, layer in layers.items() if name in layer)
            try:
                entry = RegistryEntry.model_validate(data)
            except ValidationError as exc:
                where = " + ".join(str(path) for path in defined_in)
                warnings.append(f"{where}: entry {name!r} skipped: {_first_problem(exc)}")
                continue
            entries.append(entry)
            raw[name] = data
            sources[name] = defined_in
        return RegistrySnapshot(
            directory=self.directory,
            layered=self.is_layered(),
            entries=tuple(entries),
            raw=raw,
            sources=sources,
            warnings=tuple(warnings),
        )

    # -- writing -------------------------------------------------------------------------------

    def refresh_merged_file(self) -> bool:
        """Rewrite `model_registry.json` from the layers if it is out of date. True if written."""
        if not self.is_layered():
            return False
        with exclusive_lock(self.lock_path):
            return self._write_merged(self._read())

    def _write_merged(self, snapshot: RegistrySnapshot) -> bool:
        text = dump_json(list(snapshot.raw.values()))
        try:
            current = self.merged_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        if current == text:
            return False
        write_atomic(self.merged_path, text)
        return True

    def update_entry(self, name: str, patch: Mapping[str, Any]) -> RegistryEntry:
        """Deep-merge `patch` into entry `name` and persist it, atomically and under the lock.

        In a layered registry the change goes to the discovered layer. If the curated layer sets
        one of the patched fields the change could not take effect, so it is refused."""
        with exclusive_lock(self.lock_path):
            layers = self._read_layers([])
            snapshot = self._build(layers, [])
            if snapshot.get(name) is None:
                raise EntryNotFound(name, [])
            target = self.discovered_path if snapshot.layered else self.merged_path
            items = read_json_list(target) if target.exists() else []
            position = _position_of(items, name)
            current = items[position] if position is not None else {"name": name}
            updated = apply_patch(current, patch)
            if position is None:
                items.append(updated)
            else:
                items[position] = updated

            if snapshot.layered:
                curated = layers.get(self.curated_path, {})
                top = {name: curated[name]} if name in curated else {}
                merged = merge_layers(top, {name: updated})[name]
                self._refuse_shadowed(name, patch, merged)
            else:
                merged = updated
            entry = _validate(merged, name, target)

            write_atomic(target, dump_json(items))
            if snapshot.layered:
                layers[target] = index_by_name(items, str(target), [])
                self._write_merged(self._build(layers, []))
            return entry

    def rewrite_discovered(
        self,
        rewrite: Callable[[Mapping[str, RawEntry], list[Any]], list[Any]],
        *,
        dry_run: bool = False,
    ) -> bool:
        """Replace the discovered layer's items with `rewrite(curated, items)`, atomically and
        under the lock, then refresh the merged file. True if the file changed (with `dry_run`:
        would change; nothing is written then).

        A single-file registry is rewritten in place (its entries are the "other tools'" ones
        then, and there is no curated layer); a directory with no registry file yet gets a
        discovered layer. Every entry the rewrite changed must still be valid, merged under its
        curated entry, else nothing is written. Unchanged content is never rewritten: the file
        keeps its bytes and its modification time."""
        with exclusive_lock(self.lock_path):
            layered = self.is_layered() or not self.merged_path.exists()
            layers = self._read_layers([]) if self.is_layered() or not layered else {}
            target = self.discovered_path if layered else self.merged_path
            curated = layers.get(self.curated_path, {})
            items = read_json_list(target) if target.exists() else []
            before = index_by_name(items, str(target), [])
            rewritten = rewrite(curated, copy.deepcopy(items))
            for name, item in index_by_name(rewritten, str(target), []).items():
                if before.get(name) != item:
                    top = {name: curated[name]} if name in curated else {}
                    _validate(merge_layers(top, {name: item})[name], name, target)
            text = dump_json(rewritten)
            current = target.read_text(encoding="utf-8") if target.exists() else None
            if text == current or (current is None and not rewritten):
                return False
            if dry_run:
                return True
            write_atomic(target, text)
            if layered:
                layers[target] = index_by_name(rewritten, str(target), [])
                self._write_merged(self._build(layers, []))
            return True

    def _refuse_shadowed(self, name: str, patch: Mapping[str, Any], merged: RawEntry) -> None:
        for path, value in leaves(patch):
            if lookup(merged, path) != value:
                field_name = ".".join(path)
                raise RegistryError(
                    f"{self.curated_path}: entry {name!r} sets {field_name} in the curated "
                    "layer, which tools never rewrite; change it there"
                )


def _first_problem(exc: ValidationError) -> str:
    error = exc.errors()[0]
    location = ".".join(str(part) for part in error["loc"]) or "entry"
    return f"{location}: {error['msg']}"


def _position_of(items: list[Any], name: str) -> int | None:
    for position, item in enumerate(items):
        if isinstance(item, dict) and str(item.get("name", "")).strip() == name:
            return position
    return None


def _validate(data: RawEntry, name: str, target: Path) -> RegistryEntry:
    try:
        return RegistryEntry.model_validate(data)
    except ValidationError as exc:
        raise RegistryError(
            f"{target}: the change would make entry {name!r} invalid: {_first_problem(exc)}"
        ) from exc
