"""What a GGUF file's header says about its model (file I/O; used by `imageworks-loader discover`).

Only the header and the tensor table are read, never the weights: the metadata's scalars and
strings, with arrays (the vocabulary) skipped by seeking (see `_read_header` for why not
`gguf.GGUFReader`). The `gguf` package (llama.cpp's) names the file types; it pulls in numpy,
so it is imported inside `read_gguf`, and nothing the proxy imports reaches this module.

- quantization: `general.file_type`, named as the gguf package names `LlamaFileType`
  (`MOSTLY_Q4_K_M` -> `q4_k_m`, `ALL_F32` -> `f32`);
- parameters: `general.size_label` (`135M`, `8x7B`) for the name, and the sum of every tensor's
  element count (over every part of a split file) as the exact number;
- context length: `{arch}.context_length`, the most the model was trained for (the caller
  records it as a default, never as what a server allocates);
- chat template: `tokenizer.chat_template` (the key the proxy's template check reads);
- embedding models: a `{arch}.pooling_type` key, or an encoder architecture (bert, nomic-bert...);
- not models: multimodal projectors (`general.type` `mmproj`, or arch `clip`) and LoRA adapters
  (`general.type` `adapter`): `kind` says so and the caller skips them.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

# Encoders llama.cpp serves for embeddings; any architecture naming "embed" counts too.
EMBEDDING_ARCHITECTURES = frozenset(
    {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "modern-bert"}
)
TEMPLATE_KEY = "tokenizer.chat_template"
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class GgufFacts:
    kind: str  # "model", "mmproj" or "adapter"
    architecture: str | None
    name: str | None  # general.name
    size_label: str | None  # general.size_label, e.g. "135M"
    parameters: int  # every tensor's elements, summed
    quantization: str | None  # e.g. "q4_k_m"
    context_length: int | None
    chat_template: str | None  # the embedded template's text
    embedding: bool


def split_part(path: Path) -> tuple[int, int] | None:
    """(part, of) for `x-00001-of-00003.gguf`, else None."""
    match = _SPLIT.search(path.name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def split_parts(first: Path, count: int) -> list[Path]:
    """Every part's path of a split file, given its first part."""
    stem = _SPLIT.sub("", first.name)
    return [first.with_name(f"{stem}-{n:05d}-of-{count:05d}.gguf") for n in range(1, count + 1)]


def read_gguf(path: Path, extra_parts: tuple[Path, ...] = ()) -> GgufFacts:
    """The facts of the GGUF at `path`; `extra_parts` are a split file's later parts (their
    tensors count towards the parameters). Raises ValueError for a file that is not GGUF."""
    from gguf.constants import LlamaFileType

    fields, parameters = _read_header(path)
    for part in extra_parts:
        parameters += _read_header(part)[1]
    architecture = _text(fields.get("general.architecture"))
    general_type = (_text(fields.get("general.type")) or "model").lower()
    if general_type == "mmproj" or architecture == "clip":
        kind = "mmproj"
    elif general_type == "adapter":
        kind = "adapter"
    else:
        kind = "model"
    arch = architecture or ""
    return GgufFacts(
        kind=kind,
        architecture=architecture,
        name=_text(fields.get("general.name")),
        size_label=_text(fields.get("general.size_label")),
        parameters=parameters,
        quantization=_file_type_name(LlamaFileType, fields.get("general.file_type")),
        context_length=_positive(fields.get(f"{arch}.context_length")),
        chat_template=_text(fields.get(TEMPLATE_KEY)),
        embedding=f"{arch}.pooling_type" in fields
        or arch in EMBEDDING_ARCHITECTURES
        or "embed" in arch,
    )


# GGUF value types (the gguf spec, `GGUFValueType`): struct formats of the scalars; 8 is a
# string, 9 an array. The walk below reads scalars and strings and seeks over arrays: the
# vocabulary alone is up to 262,144 strings, which `gguf.GGUFReader` turns into numpy arrays
# one by one (44 s for Gemma 3's header on a 2-core machine; this walk takes well under one).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
_SCALARS |= {10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_STRING = 64 * 1024 * 1024  # a chat template is KBs; beyond this the header is corrupt


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(metadata key -> value, arrays as None; the tensors' total element count)."""
    with path.open("rb") as handle:
        try:
            if handle.read(4) != b"GGUF":
                raise ValueError("not a GGUF file (no GGUF magic)")
            (version,) = _unpack(handle, "<I")
            if version & 0xFFFF == 0:
                raise ValueError("a big-endian GGUF file, which is not supported")
            if version not in (2, 3):  # the versions llama.cpp's own reader reads
                raise ValueError(f"GGUF version {version} is not supported")
            tensors, kv_count = _unpack(handle, "<QQ")
            fields: dict[str, Any] = {}
            for _ in range(kv_count):
                key = _string(handle)
                (value_type,) = _unpack(handle, "<I")
                fields[key] = _value(handle, value_type)
            parameters = 0
            for _ in range(tensors):
                _string(handle)  # the tensor's name
                (dims,) = _unpack(handle, "<I")
                shape = _unpack(handle, f"<{dims}Q") if dims else ()
                _unpack(handle, "<IQ")  # its type and data offset
                parameters += math.prod(shape)
        except (struct.error, UnicodeDecodeError) as exc:
            raise ValueError(f"not a readable GGUF file ({exc})") from exc
    return fields, parameters


def _unpack(handle: BinaryIO, layout: str) -> tuple[Any, ...]:
    size = struct.calcsize(layout)
    data = handle.read(size)
    if len(data) != size:
        raise ValueError("not a readable GGUF file (it ends inside its header)")
    return struct.unpack(layout, data)


def _string(handle: BinaryIO) -> str:
    (length,) = _unpack(handle, "<Q")
    if length > _MAX_STRING:
        raise ValueError(f"not a readable GGUF file (a {length}-byte string in its header)")
    data = handle.read(length)
    if len(data) != length:
        raise ValueError("not a readable GGUF file (it ends inside its header)")
    return data.decode("utf-8")


def _value(handle: BinaryIO, value_type: int) -> Any:
    if value_type in _SCALARS:
        return _unpack(handle, _SCALARS[value_type])[0]
    if value_type == _STRING:
        return _string(handle)
    if value_type == _ARRAY:
        item_type, count = _unpack(handle, "<IQ")
        if item_type in _SCALARS:
            handle.seek(struct.calcsize(_SCALARS[item_type]) * count, 1)
        elif item_type == _STRING:
            for _ in range(count):
                (length,) = _unpack(handle, "<Q")
                handle.seek(length, 1)
        else:
            for _ in range(count):
                _value(handle, item_type)
        return None  # never needed here: only that the key exists
    raise ValueError(f"not a readable GGUF file (unknown value type {value_type})")


def _file_type_name(names: Any, value: object) -> str | None:
    """`general.file_type` 15 -> `q4_k_m`; None when absent, guessed or unknown."""
    if not isinstance(value, int):
        return None
    try:
        member = names(value)
    except ValueError:
        return None
    name = str(member.name)
    if name == "GUESSED":
        return None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


def _text(value: object) -> str | None:
    return value.strip() or None if isinstance(value, str) else None


def _positive(value: object) -> int | None:
    return value if isinstance(value, int) and value > 0 else None
