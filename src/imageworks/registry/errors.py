"""Registry errors.

RegistryError               a registry file cannot be read, parsed, locked or written
├── EntryNotFound           no entry answers to a name (carries close matches)
└── AmbiguousName           several entries answer to a name (carries the candidates)
"""

from __future__ import annotations


class RegistryError(Exception):
    """A problem with the registry files, stated in one line a user can act on."""


class EntryNotFound(RegistryError):
    def __init__(self, name: str, suggestions: list[str]) -> None:
        self.name = name
        self.suggestions = suggestions
        hint = f"; did you mean: {', '.join(repr(s) for s in suggestions)}?" if suggestions else ""
        super().__init__(f"no model named {name!r} in the registry{hint}")


class AmbiguousName(RegistryError):
    def __init__(self, name: str, candidates: list[str]) -> None:
        self.name = name
        self.candidates = candidates
        super().__init__(
            f"{name!r} matches several models: {', '.join(repr(c) for c in candidates)}; "
            "use one of these exact names"
        )
