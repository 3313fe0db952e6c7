"""What a Hugging Face model folder says about its model (file I/O; for `discover`).

A folder is a model when it holds `config.json` and at least one `*.safetensors` file. Read:

- quantization: `config.json` `quantization_config.quant_method` (awq, gptq, fp8,
  compressed-tensors, bitsandbytes...), else none;
- vision: an architecture or model type that says so (`*ForConditionalGeneration` with a
  `vision_config`, or a name with VL / Vision / Llava...), or an image processor
  (`preprocessor_config.json` with image settings, or `processor_config.json`);
- embedding: a sentence-transformers folder (`modules.json`, `config_sentence_transformers.json`)
  or an encoder without a language-model head (`BertModel`, `XLMRobertaModel`...);
- chat template: `tokenizer_config.json` `chat_template`, `chat_template.json` or
  `chat_template.jinja` (the places the proxy's template check reads);
- parameters: from the safetensors headers only (8 bytes of little-endian header length, then a
  JSON header with each tensor's dtype and shape; the data is never read). Packed quantized
  weights count as the parameters they hold, and quantization scales and zero points not at all;
- context length: `max_position_embeddings` (of `text_config` for multimodal models).
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_MAX_HEADER_BYTES = 100_000_000  # a real header is a few MB; beyond this the file is not one
_VISION_WORDS = re.compile(
    r"vl|vision|llava|pixtral|idefics|paligemma|mllama|internvl|molmo|florence|smolvlm|blip",
    re.IGNORECASE,
)
# Tensors that quantization adds beside the weights: not parameters of the model.
_QUANT_AUX = re.compile(
    r"\.(qzeros|scales|g_idx|weight_scale|input_scale|weight_zero_point|weight_shape|"
    r"weight_g_idx|absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..*)$"
)
_TEMPLATE_FILES = ("chat_template.json", "chat_template.jinja")


@dataclass(frozen=True, slots=True)
class HfFacts:
    model_type: str | None
    architectures: tuple[str, ...]
    name_or_path: str | None  # config.json `_name_or_path`
    quantization: str | None
    vision: bool
    embedding: bool
    chat_template: str | None  # its text ("" when present but unreadable as text)
    parameters: int
    context_length: int | None
    size_bytes: int


def is_model_folder(folder: Path, files: list[str]) -> bool:
    return "config.json" in files and any(name.endswith(".safetensors") for name in files)


def read_hf_folder(folder: Path) -> HfFacts:
    """The facts of the model folder. Raises ValueError when its config.json is not JSON."""
    config = _json_object(folder / "config.json")
    if config is None:
        raise ValueError("config.json is not a JSON object")
    architectures = tuple(str(a) for a in config.get("architectures") or () if isinstance(a, str))
    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    quant_config = config.get("quantization_config")
    method = quant_config.get("quant_method") if isinstance(quant_config, dict) else None
    quantization = str(method).lower() if isinstance(method, str) and method else None
    bits = quant_config.get("bits") if isinstance(quant_config, dict) else None
    weights = sorted(folder.glob("*.safetensors"))
    name_or_path = config.get("_name_or_path")
    return HfFacts(
        model_type=model_type,
        architectures=architectures,
        name_or_path=name_or_path if isinstance(name_or_path, str) and name_or_path else None,
        quantization=quantization,
        vision=_vision(folder, config, architectures, model_type),
        embedding=_embedding(folder, architectures, model_type),
        chat_template=_chat_template(folder),
        parameters=sum(
            safetensors_parameters(path, bits if isinstance(bits, int) else 4) for path in weights
        ),
        context_length=_context_length(config),
        size_bytes=sum(path.stat().st_size for path in folder.iterdir() if path.is_file()),
    )


def safetensors_parameters(path: Path, bits: int = 4) -> int:
    """Parameters in one safetensors file, read from its header alone. Raises ValueError."""
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path.name}: too short for a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_HEADER_BYTES:
            raise ValueError(f"{path.name}: header length {length} is not plausible")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{path.name}: the header is not JSON") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: the header is not a JSON object")
    total = 0
    for name, tensor in header.items():
        if name == "__metadata__" or not isinstance(tensor, dict) or _QUANT_AUX.search(name):
            continue
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
            raise ValueError(f"{path.name}: tensor {name!r} has no valid shape")
        total += math.prod(shape) * _packing(str(tensor.get("dtype", "")), name, bits)
    return total


def _packing(dtype: str, name: str, bits: int) -> int:
    """How many parameters one stored element holds: an int32 of packed 4-bit weights holds 8
    (AWQ/GPTQ `qweight`, compressed-tensors `weight_packed`); bitsandbytes packs two in a byte."""
    if dtype == "I32" and name.endswith(("qweight", "weight_packed")) and 0 < bits < 32:
        return 32 // bits
    if dtype == "U8" and name.endswith(".weight"):
        return 2
    return 1


def _vision(
    folder: Path, config: dict[str, Any], architectures: tuple[str, ...], model_type: str | None
) -> bool:
    if isinstance(config.get("vision_config"), dict) and any(
        a.endswith("ForConditionalGeneration") for a in architectures
    ):
        return True
    if any(_VISION_WORDS.search(word) for word in (*architectures, model_type or "")):
        return True
    if (folder / "processor_config.json").is_file():
        return True
    preprocessor = _json_object(folder / "preprocessor_config.json")
    # Speech models (Whisper) have a preprocessor too, for audio features: images only here.
    return preprocessor is not None and any("image" in key for key in preprocessor)


def _embedding(folder: Path, architectures: tuple[str, ...], model_type: str | None) -> bool:
    if any(
        (folder / name).is_file() for name in ("modules.json", "config_sentence_transformers.json")
    ):
        return True
    if "embed" in (model_type or "").lower():
        return True
    # A bare encoder (`BertModel`, `XLMRobertaModel`, `NomicBertModel`) has no head to generate.
    return bool(architectures) and all(
        a.endswith("Model") and not a.endswith(("LMHeadModel", "ForCausalLM"))
        for a in architectures
    )


def _chat_template(folder: Path) -> str | None:
    for name in _TEMPLATE_FILES:
        path = folder / name
        if path.is_file():
            try:
                return path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                return ""
    tokenizer = _json_object(folder / "tokenizer_config.json")
    template = tokenizer.get("chat_template") if tokenizer else None
    if isinstance(template, str) and template:
        return template
    if isinstance(template, list) and template:  # named templates: [{"name", "template"}]
        return json.dumps(template)
    return None


def _context_length(config: dict[str, Any]) -> int | None:
    for section in (config.get("text_config"), config):
        if isinstance(section, dict):
            value = section.get("max_position_embeddings")
            if isinstance(value, int) and value > 0:
                return value
    return None


def _json_object(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
