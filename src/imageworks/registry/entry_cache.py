"""A value worked out once per registry entry object.

A registry reload makes new entry objects, so a value keyed by the object itself is never stale;
the entry is kept beside the value, so an id reused by a later object is not taken for it."""

from __future__ import annotations

from typing import Generic, TypeVar

from imageworks.registry.schema import RegistryEntry

V = TypeVar("V")

# Entries of old registry snapshots pile up otherwise; past this many, all are forgotten.
_MAX_ENTRIES = 1024


class PerEntry(Generic[V]):
    def __init__(self) -> None:
        self._values: dict[int, tuple[RegistryEntry, V]] = {}

    def get(self, entry: RegistryEntry) -> V | None:
        cached = self._values.get(id(entry))
        return cached[1] if cached is not None and cached[0] is entry else None

    def put(self, entry: RegistryEntry, value: V) -> V:
        if len(self._values) > _MAX_ENTRIES:
            self._values.clear()
        self._values[id(entry)] = (entry, value)
        return value
