"""Does an entry have a chat template? (File I/O: callers on an event loop use a thread.)

A model without a chat template produces garbage through `/chat/completions`, so the proxy
refuses such entries up front (CHAT_PROXY_REQUIRE_TEMPLATE). A template can come from:
- `chat_template.path` in the registry (it must exist);
- the weights: a GGUF's `tokenizer.chat_template` metadata, or a Hugging Face directory's
  `chat_template.json` / `chat_template.jinja` / `tokenizer_config.json["chat_template"]`;
- for llama.cpp, a built-in `chat_template.name`, or a `--chat_format` (llama-cpp-python),
  `--chat-template` or `--chat-template-file` (llama-server) flag in `backend_config.extra_args`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

from imageworks.backends.argv import flags_in
from imageworks.registry.paths import resolve_local_path, weights_path
from imageworks.registry.schema import RegistryEntry

TEMPLATE_FLAGS = frozenset({"chat-format", "chat-template", "chat-template-file"})
GGUF_TEMPLATE_KEY = "tokenizer.chat_template"


@dataclass(frozen=True, slots=True)
class TemplateCheck:
    ok: bool
    reason: str  # where the template comes from, or why there is none


def check_chat_template(entry: RegistryEntry, registry_dir: Path) -> TemplateCheck:
    configured = resolve_local_path(entry.chat_template.path, registry_dir)
    if configured is not None:
        if configured.is_file():
            return TemplateCheck(True, f"chat_template.path {configured}")
        return TemplateCheck(False, f"its chat_template.path {configured} does not exist")
    if entry.backend == "llamacpp":
        if entry.chat_template.name is not None:
            return TemplateCheck(True, f"chat_template.name {entry.chat_template.name}")
        if flags_in(entry.backend_config.extra_args) & TEMPLATE_FLAGS:
            return TemplateCheck(True, "a chat template flag in backend_config.extra_args")
    weights = weights_path(entry, registry_dir)
    if weights is None or not weights.exists():
        # Nothing to read a template from; starting the model will report the missing weights.
        return TemplateCheck(True, "unknown: the weights are not on disk")
    stat = weights.stat()
    if _embedded_template(weights, stat.st_mtime_ns, stat.st_size):
        return TemplateCheck(True, f"the template embedded in {weights.name}")
    return TemplateCheck(False, f"{weights.name} embeds no chat template")


@lru_cache(maxsize=256)
def _embedded_template(weights: Path, mtime_ns: int, size: int) -> bool:
    """Cached per file version (the mtime and size are part of the key)."""
    if weights.is_dir():
        return _hf_directory_has_template(weights)
    try:
        with weights.open("rb") as handle:
            return gguf_has_key(handle, GGUF_TEMPLATE_KEY)
    except (OSError, ValueError, struct.error):
        return False


def _hf_directory_has_template(directory: Path) -> bool:
    if any((directory / name).is_file() for name in ("chat_template.json", "chat_template.jinja")):
        return True
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("chat_template"))


# GGUF metadata value types (gguf spec): scalar sizes in bytes; 8 = string, 9 = array.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def gguf_has_key(handle: BinaryIO, wanted: str) -> bool:
    """True if the GGUF file's metadata has `wanted`. Reads only the header, skipping values
    (the token list alone is tens of thousands of strings) without loading any tensor."""
    if handle.read(4) != b"GGUF":
        raise ValueError("not a GGUF file")
    version, _tensors, kv_count = struct.unpack("<IQQ", handle.read(20))
    if version < 2:
        raise ValueError(f"GGUF version {version} is not supported")
    for _ in range(kv_count):
        key = _read_string(handle)
        if key == wanted:
            return True
        (value_type,) = struct.unpack("<I", handle.read(4))
        _skip_value(handle, value_type)
    return False


def _read_string(handle: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", handle.read(8))
    return handle.read(length).decode("utf-8", "replace")


def _skip_value(handle: BinaryIO, value_type: int) -> None:
    if value_type in _SCALAR_SIZES:
        handle.seek(_SCALAR_SIZES[value_type], 1)
    elif value_type == _STRING:
        (length,) = struct.unpack("<Q", handle.read(8))
        handle.seek(length, 1)
    elif value_type == _ARRAY:
        item_type, count = struct.unpack("<IQ", handle.read(12))
        if item_type in _SCALAR_SIZES:
            handle.seek(_SCALAR_SIZES[item_type] * count, 1)
        else:
            for _ in range(count):
                _skip_value(handle, item_type)
    else:
        raise ValueError(f"unknown GGUF value type {value_type}")
