"""The discovered layer after a discovery run: a pure diff and merge (no I/O, the date passed in).

`plan(found, scanned, curated, items, ...)` takes what was found, which sources were really
scanned, the curated layer and the discovered layer's items, and returns the new items and what
changed. Its rules:

- Discovery's entries carry `metadata.discovered = {source, path | tag, ...}`; entries without
  it belong to other tools and are never changed. On its own entries discovery writes only the
  fields in `discovered_entries.OWNED`, so what other tools added (a version lock, extra_args)
  stays.
- A model found again is its entry, matched by path or tag (never by name): updated in place,
  keeping its logical name (its display name follows the naming rules, so a replaced file's
  new quantization shows). A new one gets the name the naming rules give it; if another entry has
  that name, the path or tag is added in brackets so it never merges into someone else's entry.
- Curated wins: a model a curated entry (or another tool's entry) already points at, by weights
  path (symlinks resolved) or Ollama tag, is not added again ("curated as X"). An entry
  discovery added before such a curated entry appeared is removed, unless another tool wrote
  fields on it (then it stays and a warning says so). A curated entry with the same name as
  discovery's is an override (the layer merge puts its fields over discovery's), not a rival.
- An entry whose file or tag is gone, from a source scanned this run (the Ollama server
  answered; the path is under the scanned weights directory), is marked
  `metadata.discovered.missing: true` with `missing_since` (the date), never deleted, and
  unmarked when it comes back. Entries from sources not scanned are left as they are.
- Nothing time-dependent is written unless something changed, so a second run is a no-op.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imageworks.registry.discovered_entries import OLLAMA, OWNED, WEIGHTS, Found
from imageworks.registry.layers import RawEntry, leaves, lookup
from imageworks.registry.naming import logical_slug, simplified_display
from imageworks.registry.paths import resolve_local_path


@dataclass(frozen=True)
class Scanned:
    """The sources this run really looked at."""

    weights_root: Path | None  # absolute; None: no weights directory was scanned
    ollama: bool  # the Ollama server answered


@dataclass
class Change:
    name: str
    display_name: str
    backend: str
    source: str
    key: str
    fields: list[str] = field(default_factory=list)  # for updates: the fields that changed
    since: str | None = None  # for missing entries

    def as_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "name": self.name,
            "display_name": self.display_name,
            "backend": self.backend,
            "source": self.source,
            "path" if self.source == WEIGHTS else "tag": self.key,
        }
        if self.fields:
            document["fields"] = self.fields
        if self.since:
            document["since"] = self.since
        return document


@dataclass
class Plan:
    items: list[Any]
    added: list[Change] = field(default_factory=list)
    updated: list[Change] = field(default_factory=list)
    missing: list[Change] = field(default_factory=list)  # newly marked
    restored: list[Change] = field(default_factory=list)  # were missing, found again
    removed: list[Change] = field(default_factory=list)  # now curated under another name
    curated: list[tuple[str, str]] = field(default_factory=list)  # (path or tag, entry name)
    unchanged: list[str] = field(default_factory=list)
    still_missing: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated or self.missing or self.restored or self.removed)


def identity(item: Mapping[str, Any]) -> tuple[str, str] | None:
    """(source, path or tag) of an entry discovery wrote; None for other tools' entries."""
    metadata = item.get("metadata")
    marker = metadata.get("discovered") if isinstance(metadata, Mapping) else None
    if not isinstance(marker, Mapping):
        return None
    source = marker.get("source")
    key = marker.get("path") if source == WEIGHTS else marker.get("tag")
    if source in (WEIGHTS, OLLAMA) and isinstance(key, str) and key:
        return str(source), key
    return None


def plan(
    found: Sequence[Found],
    scanned: Scanned,
    curated: Mapping[str, RawEntry],
    items: Sequence[Any],
    *,
    registry_dir: Path,
    today: str,
) -> Plan:
    result = Plan(items=[copy.deepcopy(item) for item in items])
    own: dict[tuple[str, str], int] = {}
    for position, item in enumerate(result.items):
        key = identity(item) if isinstance(item, dict) else None
        if key is not None and key not in own:
            own[key] = position
    foreign = [*curated.values()]
    foreign += [item for i, item in enumerate(result.items) if i not in own.values()]
    claimed = _targets(foreign, registry_dir)
    taken = {_name(item) for item in [*foreign, *result.items]} - {""}
    remove: set[int] = set()
    seen: set[tuple[str, str]] = set()

    for thing in found:
        key = (thing.source, thing.key)
        seen.add(key)
        at = own.get(key)
        owner = claimed.get(_target(thing.source, thing.key))
        # A curated entry of the entry's own name is an override, merged over it: not a rival.
        if owner is not None and (at is None or _name(result.items[at]) != owner):
            result.curated.append((thing.key, owner))
            if at is not None:
                _drop(result, at, owner, remove)
            continue
        result.warnings += [f"{thing.key}: {note}" for note in thing.notes]
        if at is None:
            _add(result, thing, taken)
        else:
            _update(result, at, thing, taken)

    for key, position in own.items():
        if key in seen or position in remove or not _was_scanned(key, scanned):
            continue
        _mark_missing(result, position, today)
    result.items = [item for i, item in enumerate(result.items) if i not in remove]
    return result


def _name(item: Any) -> str:
    return str(item.get("name", "")).strip() if isinstance(item, dict) else ""


def _change(item: RawEntry, source: str, key: str) -> Change:
    display = str(item.get("display_name") or item.get("name", ""))
    return Change(_name(item), display, str(item.get("backend", "")), source, key)


def _add(result: Plan, thing: Found, taken: set[str]) -> None:
    quantization = thing.fields.get("quantization")
    display = simplified_display(thing.stem, thing.parameter_size, quantization)
    label = thing.key if thing.source == OLLAMA else os.path.basename(thing.key)
    candidates = [display, f"{display} [{label}]"]
    candidates += [f"{display} [{label}] #{n}" for n in range(2, 100)]
    display = next(c for c in candidates if logical_slug(c) not in taken)
    entry: RawEntry = {"name": logical_slug(display), "display_name": display}
    entry = _apply(entry, {**thing.fields, "display_name": display})
    taken.add(entry["name"])
    result.items.append(entry)
    result.added.append(_change(entry, thing.source, thing.key))


def _update(result: Plan, position: int, thing: Found, taken: set[str]) -> None:
    old = result.items[position]
    # The logical name stays (registry tools refer to it); the display name, the id clients
    # see, follows the model (a replaced file's new quantization), unless it would then be
    # another entry's name.
    display = simplified_display(thing.stem, thing.parameter_size, thing.fields.get("quantization"))
    if logical_slug(display) in taken - {_name(old)}:
        display = old.get("display_name") or display
    new = _apply(old, {**thing.fields, "display_name": display})
    change = _change(new, thing.source, thing.key)
    marker = old["metadata"]["discovered"]
    if marker.get("missing"):
        result.restored.append(change)
    differences = _differences(old, new)
    if differences:
        change.fields = differences
        if not marker.get("missing"):
            result.updated.append(change)
        result.items[position] = new
    else:
        result.unchanged.append(change.name)


def _drop(result: Plan, position: int, owner: str, remove: set[int]) -> None:
    item = result.items[position]
    key = identity(item) or ("", "")
    change = _change(item, *key)
    others = [".".join(path) for path, _ in leaves(item) if not _owned(path)]
    if others:
        result.warnings.append(
            f"{change.name} is also curated as {owner}; it keeps fields other tools wrote "
            f"({', '.join(others)}), so it was left: remove one of the two"
        )
        return
    remove.add(position)
    result.removed.append(change)


def _mark_missing(result: Plan, position: int, today: str) -> None:
    item = result.items[position]
    source, key = identity(item) or ("", "")
    marker = item["metadata"]["discovered"]
    change = _change(item, source, key)
    if marker.get("missing"):
        result.still_missing.append(change.name)
        return
    marker["missing"] = True
    marker["missing_since"] = today
    change.since = today
    result.missing.append(change)


def _was_scanned(key: tuple[str, str], scanned: Scanned) -> bool:
    source, where = key
    if source == OLLAMA:
        return scanned.ollama
    root = scanned.weights_root
    return root is not None and Path(where).is_relative_to(root)


def _owned(path: tuple[str, ...]) -> bool:
    return path == ("name",) or any(path[: len(owned)] == owned for owned in OWNED)


def _apply(entry: Mapping[str, Any], fields: Mapping[str, Any]) -> RawEntry:
    """`entry` with every owned field set from `fields` (None or absent: removed)."""
    updated: RawEntry = copy.deepcopy(dict(entry))
    for path in OWNED:
        value = lookup(fields, path) if path[0] in fields else None
        if value is None or value == {}:
            _remove(updated, path)
        else:
            parent = updated
            for part in path[:-1]:
                if not isinstance(parent.get(part), dict):
                    parent[part] = {}
                parent = parent[part]
            parent[path[-1]] = copy.deepcopy(value)
    return updated


def _remove(entry: RawEntry, path: tuple[str, ...]) -> None:
    parents = [entry]
    for part in path[:-1]:
        child = parents[-1].get(part)
        if not isinstance(child, dict):
            return
        parents.append(child)
    parents[-1].pop(path[-1], None)
    # A section left empty by the removal goes too, so a file does not fill with `{}`.
    for depth in range(len(parents) - 1, 0, -1):
        if parents[depth]:
            break
        parents[depth - 1].pop(path[depth - 1], None)


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    paths = {path for path, _ in leaves(old)} | {path for path, _ in leaves(new)}
    return sorted(".".join(p) for p in paths if lookup(old, p) != lookup(new, p))


def _targets(entries: Iterable[Any], registry_dir: Path) -> dict[tuple[str, str], str]:
    """What other entries point at -> the first one's name (curated entries come first)."""
    claimed: dict[tuple[str, str], str] = {}
    for item in entries:
        if not isinstance(item, dict) or not _name(item):
            continue
        for target in _entry_targets(item, registry_dir):
            claimed.setdefault(target, _name(item))
    return claimed


def _entry_targets(item: Mapping[str, Any], registry_dir: Path) -> list[tuple[str, str]]:
    if str(item.get("backend", "")).lower() == OLLAMA:
        config = item.get("backend_config")
        path = config.get("model_path") if isinstance(config, Mapping) else None
        tag = item.get("served_model_id")
        if not isinstance(tag, str) or tag.strip().lower() in ("", "none", "null"):
            tag = (
                path.split(":", 1)[1].lstrip("/") if isinstance(path, str) and ":" in path else None
            )
        return [(OLLAMA, _tag_key(tag or _name(item)))]
    config = item.get("backend_config")
    raw_paths = [item.get("download_path")]
    raw_paths.append(config.get("model_path") if isinstance(config, Mapping) else None)
    targets = []
    for raw in raw_paths:
        path = resolve_local_path(raw, registry_dir) if isinstance(raw, str) else None
        if path is not None:
            targets.append((WEIGHTS, os.path.realpath(path)))
    return targets


def _target(source: str, key: str) -> tuple[str, str]:
    return (OLLAMA, _tag_key(key)) if source == OLLAMA else (WEIGHTS, os.path.realpath(key))


def _tag_key(tag: str) -> str:
    """Ollama's spelling: `phi4` is `phi4:latest`; case does not matter."""
    tag = tag.strip().lower()
    return tag if ":" in tag.rsplit("/", 1)[-1] else f"{tag}:latest"
