"""What discovery found, as the registry fields it owns (pure: facts in, `Found` out).

Each found model becomes a `Found`: where it came from (`source` and `key`: the file or folder
path, or the Ollama tag), what to name it from, and the fields discovery writes. Those fields
are the only ones it ever writes on an entry (`OWNED`); whatever else an entry holds (a version
lock, extra_args, notes) belongs to other tools and is kept.

Names follow the registry's naming rules: `simplified_display(stem, size, quant)`, e.g.
`llama 12.2b (Q4 K M)`, and the logical name is its `logical_slug`. The stem is:
- for a GGUF file, its file name without the quantization and split suffixes (publishers name
  files precisely: `Qwen2.5-7B-Instruct-Q4_K_M.gguf`; `general.name` is often a training-run
  label), else `general.name` when the file name is generic (`model.gguf`);
- for a Hugging Face folder, the folder's name (in a Hugging Face cache, the repository's name);
- for Ollama, the tag's model name with what its tag adds beyond size and quantization
  (`mistral:instruct` -> `mistral-instruct`, `qwen3:8b` -> `qwen3`).
A name that already states a size gets none added.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from imageworks.registry.gguf_info import GgufFacts
from imageworks.registry.hf_folder import HfFacts
from imageworks.registry.layers import RawEntry
from imageworks.registry.ollama_tags import OllamaModel

WEIGHTS, OLLAMA = "weights", "ollama"

# Every field discovery writes (paths into an entry). Others are never touched.
CAPABILITY_KEYS = ("text", "vision", "tools", "thinking", "embedding")
OWNED: tuple[tuple[str, ...], ...] = (
    ("backend",),
    ("display_name",),
    ("served_model_id",),
    ("family",),
    ("quantization",),
    ("download_path",),
    ("download_format",),
    ("download_size_bytes",),
    ("backend_config", "model_path"),
    *(("capabilities", key) for key in CAPABILITY_KEYS),
    ("chat_template", "source"),
    ("generation_defaults", "context_window"),
    ("roles",),
    ("metadata", "discovered"),
)

_SIZE_TOKEN = re.compile(r"(?<![a-z0-9.])\d+(?:\.\d+)?(?:x\d+(?:\.\d+)?)?[mbt](?![a-z0-9])")
_GENERIC_STEMS = frozenset({"", "model", "ggml-model", "consolidated", "weights", "gguf"})
_OLLAMA_CAPABILITIES = {
    "completion": "text",
    "vision": "vision",
    "tools": "tools",
    "thinking": "thinking",
    "embedding": "embedding",
}


@dataclass(frozen=True)
class Found:
    source: str  # WEIGHTS or OLLAMA
    key: str  # the absolute file or folder path, or the Ollama tag
    stem: str  # what the name is built from
    parameter_size: str | None  # e.g. "7.6b"; None when the stem already says it
    fields: RawEntry  # the owned fields discovery sets (absent ones are removed)
    notes: tuple[str, ...] = field(default=())  # worth telling the user, e.g. no chat template


def parameter_label(count: int) -> str | None:
    """`7_615_616_512` -> `7.6b`, `134_515_008` -> `135m`; None for 0."""
    if count <= 0:
        return None
    if count >= 1_000_000_000:
        return f"{count / 1e9:.1f}".removesuffix(".0") + "b"
    if count >= 1_000_000:
        return f"{round(count / 1e6)}m"
    return f"{round(count / 1e3)}k"


def _size_for(stem: str, size: str | None) -> str | None:
    return None if _SIZE_TOKEN.search(stem.lower()) else size


def _template_capabilities(template: str | None) -> dict[str, bool]:
    """What a chat template shows the model can do: only ever True (silence proves nothing)."""
    if not template:
        return {}
    found: dict[str, bool] = {}
    if "tools" in template:
        found["tools"] = True
    if "<think>" in template or "enable_thinking" in template:
        found["thinking"] = True
    return found


def _weights_entry(
    backend: str,
    path: str,
    fmt: str,
    *,
    facts: dict[str, Any],
    template: str | None,
    embedding: bool,
    capabilities: dict[str, bool],
    quantization: str | None,
    family: str | None,
    context: int | None,
    size_bytes: int,
) -> RawEntry:
    chat = template is not None
    return {
        "backend": backend,
        "family": family,
        "quantization": quantization,
        "download_path": path,
        "download_format": fmt,
        "download_size_bytes": size_bytes or None,
        "backend_config": {"model_path": path},
        "capabilities": (
            {"embedding": True, "text": False}
            if embedding
            else {"text": True, **capabilities, **_template_capabilities(template)}
        ),
        "chat_template": {"source": "embedded"} if chat else {},
        "generation_defaults": {"context_window": context},
        "roles": ["embedding"] if embedding else ["chat"],
        "metadata": {"discovered": {"source": WEIGHTS, "path": path, **facts}},
    }


def _template_note(template: str | None, embedding: bool) -> tuple[str, ...]:
    if template is not None or embedding:
        return ()
    return (
        "no chat template: the proxy refuses chat requests for it until one is set "
        "(chat_template.name or chat_template.path in the curated layer)",
    )


def from_gguf(
    path: str, file_name: str, facts: GgufFacts, size_bytes: int, mmproj: str | None
) -> Found:
    stem = re.sub(r"-\d{5}-of-\d{5}$", "", file_name.removesuffix(".gguf"))
    if facts.quantization:
        stem = re.sub(rf"[._-]{re.escape(facts.quantization)}$", "", stem, flags=re.IGNORECASE)
    if stem.lower() in _GENERIC_STEMS and facts.name:
        stem = facts.name
    size = facts.size_label.lower() if facts.size_label else parameter_label(facts.parameters)
    extra: dict[str, Any] = {"parameters": facts.parameters or None, "mmproj": mmproj}
    extra["architecture"] = facts.architecture
    # A projector beside it makes images possible once --mmproj is passed: unknown until then.
    vision = {} if mmproj else {"vision": False}
    fields = _weights_entry(
        "llamacpp",
        path,
        "gguf",
        facts={k: v for k, v in extra.items() if v is not None},
        template=facts.chat_template,
        embedding=facts.embedding,
        capabilities=vision,
        quantization=facts.quantization,
        family=facts.architecture,
        context=facts.context_length,
        size_bytes=size_bytes,
    )
    notes = _template_note(facts.chat_template, facts.embedding)
    if mmproj:
        notes += (f"projector {mmproj} beside it: add --mmproj to its extra_args for images",)
    return Found(WEIGHTS, path, stem, _size_for(stem, size), fields, notes)


def from_hf_folder(path: str, stem: str, facts: HfFacts) -> Found:
    size = parameter_label(facts.parameters)
    extra: dict[str, Any] = {"parameters": facts.parameters or None}
    if facts.architectures:
        extra["architecture"] = facts.architectures[0]
    fields = _weights_entry(
        "vllm",
        path,
        "safetensors",
        facts={k: v for k, v in extra.items() if v is not None},
        template=facts.chat_template,
        embedding=facts.embedding,
        capabilities={"vision": facts.vision},
        quantization=facts.quantization,
        family=facts.model_type,
        context=facts.context_length,
        size_bytes=facts.size_bytes,
    )
    notes = _template_note(facts.chat_template, facts.embedding)
    return Found(WEIGHTS, path, stem, _size_for(stem, size), fields, notes)


def ollama_stem(tag: str, quantization: str | None) -> str:
    """`qwen3:8b` -> `qwen3`; `mistral:instruct` -> `mistral-instruct`;
    `hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M` -> `Llama-3.2-1B-Instruct-GGUF`."""
    model, _, variant = tag.rpartition(":") if ":" in tag else (tag, "", "")
    model = model.rsplit("/", 1)[-1]
    words = [w for w in re.split(r"[-_]", variant) if w]
    quant = (quantization or "").lower().replace("-", "_")
    kept = []
    for word in words:
        lowered = word.lower()
        if lowered == "latest" or _SIZE_TOKEN.fullmatch(lowered) or lowered in quant.split("_"):
            continue
        kept.append(word)
    # `q4_K_M` in a tag splits into `q4`, `K`, `M`: all dropped above when they spell the quant.
    return "-".join([model, *kept])


def from_ollama(model: OllamaModel) -> Found:
    quantization = model.quantization.lower() if model.quantization else None
    stem = ollama_stem(model.tag, quantization)
    capabilities: dict[str, bool] = {}
    if model.capabilities is not None:
        offered = {_OLLAMA_CAPABILITIES[c] for c in model.capabilities if c in _OLLAMA_CAPABILITIES}
        capabilities = {key: key in offered for key in CAPABILITY_KEYS}
    embedding = capabilities.get("embedding", False)
    discovered: dict[str, Any] = {"source": OLLAMA, "tag": model.tag}
    if model.digest:
        discovered["digest"] = model.digest
    fields: RawEntry = {
        "backend": "ollama",
        "served_model_id": model.tag,
        "family": model.family,
        "quantization": quantization,
        "download_format": model.format,
        "download_size_bytes": model.size_bytes,
        "capabilities": capabilities,
        "generation_defaults": {"context_window": model.context_length},
        "roles": ["embedding"] if embedding else ["chat"],
        "metadata": {"discovered": discovered},
    }
    size = model.parameter_size.lower() if model.parameter_size else None
    return Found(OLLAMA, model.tag, stem, _size_for(stem, size), fields)
