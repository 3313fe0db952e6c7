"""Merging registry layers: pure functions over raw JSON, no I/O.

The curated layer is what people edit; the discovered layer is what tools write. For a name in both,
curated wins field by field: nested objects merge key by key, anything else (lists included) is
replaced, and a curated `null` does not erase a discovered value (it means "not set here").
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

RawEntry = dict[str, Any]


def overlay(base: Mapping[str, Any], top: Mapping[str, Any]) -> RawEntry:
    """`top` over `base`, the layering rule above. Neither input is modified."""
    return _merge(base, top, nulls_set=False)


def apply_patch(base: Mapping[str, Any], patch: Mapping[str, Any]) -> RawEntry:
    """Like `overlay`, but an explicit None in `patch` does set the field to null."""
    return _merge(base, patch, nulls_set=True)


def _merge(base: Mapping[str, Any], top: Mapping[str, Any], *, nulls_set: bool) -> RawEntry:
    merged: RawEntry = copy.deepcopy(dict(base))
    for key, value in top.items():
        if value is None and not nulls_set:
            continue
        current = merged.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            merged[key] = _merge(current, value, nulls_set=nulls_set)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def leaves(
    data: Mapping[str, Any], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every (key path, value) in a nested mapping, with non-mapping values as leaves."""
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            yield from leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def lookup(data: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    current: Any = data
    for key in path:
        if not isinstance(current, Mapping) or key not in current:
            return None
        current = current[key]
    return current


def index_by_name(items: Iterable[Any], source: str, warnings: list[str]) -> dict[str, RawEntry]:
    """Name -> raw entry for one layer file. Items that cannot be keyed are skipped with a
    warning naming `source` and the item; for a repeated name the first one is kept."""
    by_name: dict[str, RawEntry] = {}
    for position, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            warnings.append(f"{source}: entry #{position} skipped: not a JSON object")
            continue
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            warnings.append(f"{source}: entry #{position} skipped: missing or empty 'name'")
            continue
        name = name.strip()
        if name in by_name:
            warnings.append(f"{source}: entry {name!r} skipped: the name appears earlier")
            continue
        by_name[name] = item
    return by_name


def merge_layers(
    curated: Mapping[str, RawEntry], discovered: Mapping[str, RawEntry]
) -> dict[str, RawEntry]:
    """Every name from either layer, in name order; curated over discovered where both have it."""
    merged: dict[str, RawEntry] = {}
    for name in sorted(set(curated) | set(discovered)):
        if name in curated and name in discovered:
            entry = overlay(discovered[name], curated[name])
        else:  # in one layer only: kept exactly as written, nulls included
            entry = copy.deepcopy(curated.get(name) or discovered[name])
        entry["name"] = name
        merged[name] = entry
    return merged
