"""Where an entry's weights are on disk.

Paths in registry files are absolute (as downloaders write them) or relative; a relative path is
taken relative to the registry directory, so a registry and its models can move together and the
answer never depends on the current working directory.
"""

from __future__ import annotations

from pathlib import Path

from imageworks.registry.schema import RegistryEntry

# Pseudo-paths that name a model inside a backend rather than a file (`ollama:/qwen3:8b`).
_BACKEND_SCHEMES = ("ollama:",)


def is_backend_reference(raw: str) -> bool:
    return raw.strip().lower().startswith(_BACKEND_SCHEMES)


def resolve_local_path(raw: str | None, base_dir: Path) -> Path | None:
    """The filesystem path `raw` names, or None for empty values and backend pseudo-paths."""
    if raw is None:
        return None
    raw = raw.strip()
    if not raw or is_backend_reference(raw):
        return None
    path = Path(raw).expanduser()
    return path if path.is_absolute() else base_dir / path


def weights_path(entry: RegistryEntry, base_dir: Path) -> Path | None:
    """The entry's weights (a file or a directory): `download_path`, else
    `backend_config.model_path`, whichever exists first; else the first one given."""
    candidates = [
        path
        for path in (
            resolve_local_path(entry.download_path, base_dir),
            resolve_local_path(entry.backend_config.model_path, base_dir),
        )
        if path is not None
    ]
    for path in candidates:
        if path.exists():
            return path
    return candidates[0] if candidates else None
