"""What a GGUF file's header says about its model (file I/O; used by `imageworks-loader discover`).

The `gguf` package (llama.cpp's own reader) parses the header; it pulls in numpy, so it is
imported here, inside `read_gguf`, and nothing the proxy imports reaches this module. The reader
maps the file and reads only the header and tensor table, never the weights.

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

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, OverflowError) as exc:
        raise ValueError(f"not a readable GGUF file ({exc})") from exc
    fields: dict[str, Any] = {}
    for key, field in reader.fields.items():
        # Arrays (the vocabulary: tens of thousands of strings) are never needed here.
        if field.types and field.types[0] != gguf.GGUFValueType.ARRAY:
            fields[key] = field.contents()
    parameters = sum(int(tensor.n_elements) for tensor in reader.tensors)
    for part in extra_parts:
        try:
            parameters += sum(int(t.n_elements) for t in gguf.GGUFReader(part).tensors)
        except (ValueError, KeyError, IndexError, OverflowError) as exc:
            raise ValueError(f"part {part.name} is not a readable GGUF file ({exc})") from exc

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
        quantization=_file_type_name(gguf.LlamaFileType, fields.get("general.file_type")),
        context_length=_positive(fields.get(f"{arch}.context_length")),
        chat_template=_text(fields.get(TEMPLATE_KEY)),
        embedding=f"{arch}.pooling_type" in fields
        or arch in EMBEDDING_ARCHITECTURES
        or "embed" in arch,
    )


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
