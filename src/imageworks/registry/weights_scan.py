"""Walk a weights directory and read every model in it (file I/O; for `discover`).

- The walk is recursive to `MAX_DEPTH` levels, skips hidden files and folders, and follows
  symlinks, each real folder once (a link loop or a second link to the same folder is not
  walked again; the first path in sorted order is the one recorded).
- A folder with `config.json` and `*.safetensors` is one Hugging Face model (its subfolders are
  its own: not walked). In a Hugging Face cache (`models--org--name/snapshots/<hash>/`) the
  model is named after the repository.
- Each `*.gguf` file is one model; a split file (`-00001-of-00003.gguf`) is one model under its
  first part, and is skipped with a warning while a part is missing. Projectors (`mmproj` in
  the name or header) and LoRA adapters are not models: skipped, and a folder's single
  projector is noted on the models beside it.
Paths are recorded absolute, as found (symlinks not resolved), so they stay the entry's identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from imageworks.registry.discovered_entries import Found, from_gguf, from_hf_folder
from imageworks.registry.gguf_info import read_gguf, split_part, split_parts
from imageworks.registry.hf_folder import is_model_folder, read_hf_folder

MAX_DEPTH = 8


@dataclass
class WeightsScan:
    found: list[Found] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def scan_weights(root: Path) -> WeightsScan:
    """Every model under `root` (an existing directory), sorted by path."""
    scan = WeightsScan()
    seen: set[str] = set()
    _walk(root.absolute(), 0, seen, scan)
    scan.found.sort(key=lambda found: found.key)
    return scan


def _walk(folder: Path, depth: int, seen: set[str], scan: WeightsScan) -> None:
    real = os.path.realpath(folder)
    if real in seen:
        return
    seen.add(real)
    try:
        names = sorted(name for name in os.listdir(folder) if not name.startswith("."))
    except OSError as exc:
        scan.warnings.append(f"{folder}: cannot be read ({exc.strerror or exc}); skipped")
        return
    if is_model_folder(folder, names):
        _read_folder(folder, scan)
        return
    ggufs = [name for name in names if name.lower().endswith(".gguf") and (folder / name).is_file()]
    projectors = [name for name in ggufs if "mmproj" in name.lower()]
    mmproj = str(folder / projectors[0]) if len(projectors) == 1 else None
    for name in ggufs:
        if name not in projectors:
            _read_gguf_file(folder / name, mmproj, scan)
    if depth >= MAX_DEPTH:
        return
    for name in names:
        child = folder / name
        if child.is_dir():
            _walk(child, depth + 1, seen, scan)


def _read_gguf_file(path: Path, mmproj: str | None, scan: WeightsScan) -> None:
    split = split_part(path)
    extra: tuple[Path, ...] = ()
    if split is not None:
        number, count = split
        if number != 1:
            return  # counted with its first part
        parts = split_parts(path, count)
        missing = [part.name for part in parts if not part.is_file()]
        if missing:
            scan.warnings.append(f"{path}: split file without {', '.join(missing)}; skipped")
            return
        extra = tuple(parts[1:])
    try:
        facts = read_gguf(path, extra)
    except (OSError, ValueError) as exc:
        scan.warnings.append(f"{path}: {exc}; skipped")
        return
    if facts.kind != "model":
        return  # a projector or an adapter: not a model to serve
    size = sum(part.stat().st_size for part in (path, *extra))
    scan.found.append(from_gguf(str(path), path.name, facts, size, mmproj))


def _read_folder(folder: Path, scan: WeightsScan) -> None:
    try:
        facts = read_hf_folder(folder)
    except (OSError, ValueError) as exc:
        scan.warnings.append(f"{folder}: {exc}; skipped")
        return
    scan.found.append(from_hf_folder(str(folder), _folder_stem(folder), facts))


def _folder_stem(folder: Path) -> str:
    """The folder's name; in a Hugging Face cache, the repository's (`models--Qwen--X` -> X)."""
    parent = folder.parent
    if parent.name == "snapshots" and parent.parent.name.startswith("models--"):
        return parent.parent.name.split("--")[-1]
    return folder.name
