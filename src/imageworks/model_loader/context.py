"""What every loader command gets, and how it answers: text for people, or one JSON document."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from imageworks.config import RegistrySettings
from imageworks.registry.naming import NameIndex, display_name
from imageworks.registry.schema import RegistryEntry
from imageworks.registry.store import RegistrySnapshot, RegistryStore


@dataclass(frozen=True)
class Context:
    """What every command gets: its arguments, the registry, and where to print."""

    args: argparse.Namespace
    store: RegistryStore
    snapshot: RegistrySnapshot
    settings: RegistrySettings
    out: TextIO

    def emit(self, document: Any, text: str | Callable[[], str]) -> None:
        """The JSON document with --json, else the text for people."""
        if self.args.json:
            json.dump(document, self.out, indent=2)
            self.out.write("\n")
        else:
            self.out.write(text if isinstance(text, str) else text())

    def resolve(self, name: str) -> RegistryEntry:
        return NameIndex(self.snapshot.entries).resolve(name)

    def display(self, name: str) -> str | None:
        entry = self.snapshot.get(name)
        return display_name(entry) if entry is not None else None
