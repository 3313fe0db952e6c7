"""Which models an Ollama server has installed, and what it says about each (HTTP; for `discover`).

`GET /api/tags` lists the models (name, size, digest, `details.parameter_size`,
`details.quantization_level`, `details.family`, `details.format`). `POST /api/show` adds, on
servers that have it, a `capabilities` list (`completion`, `vision`, `tools`, `thinking`,
`embedding`...) and `model_info` with `{architecture}.context_length`. A model whose show fails
keeps what the tags said; a server that cannot be listed raises `OllamaUnreachable`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx


class OllamaUnreachable(Exception):
    """The server did not answer `/api/tags` with a model list."""


@dataclass(frozen=True, slots=True)
class OllamaModel:
    tag: str  # as /api/tags names it, e.g. `qwen3:8b`
    family: str | None
    parameter_size: str | None  # e.g. `8.2B`
    quantization: str | None  # e.g. `Q4_K_M`
    format: str | None
    size_bytes: int | None
    digest: str | None
    capabilities: tuple[str, ...] | None  # None: the server did not say
    context_length: int | None


def list_models(host: str, timeout_s: float) -> list[OllamaModel]:
    """Every installed model, sorted by tag. Raises OllamaUnreachable."""
    root = host.rstrip("/")
    if not root.startswith(("http://", "https://")):
        root = f"http://{root}"
    with httpx.Client(timeout=httpx.Timeout(timeout_s)) as client:
        try:
            response = client.get(f"{root}/api/tags")
            response.raise_for_status()
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise OllamaUnreachable(f"{root}: {exc or type(exc).__name__}") from exc
        items = body.get("models") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise OllamaUnreachable(f"{root}/api/tags did not answer a model list")
        models = [
            _model(item, _show(client, root, str(item["name"])))
            for item in items
            if isinstance(item, dict) and isinstance(item.get("name"), str) and item["name"]
        ]
    return sorted(models, key=lambda model: model.tag)


def _show(client: httpx.Client, root: str, tag: str) -> dict[str, Any]:
    try:
        response = client.post(f"{root}/api/show", json={"model": tag})
        response.raise_for_status()
        body = response.json()
    except (httpx.HTTPError, ValueError):
        return {}  # an older server, or one model it cannot describe: the tags still count
    return body if isinstance(body, dict) else {}


def _model(item: dict[str, Any], shown: dict[str, Any]) -> OllamaModel:
    details = _section(item, "details")
    capabilities = shown.get("capabilities")
    info = _section(shown, "model_info")
    architecture = info.get("general.architecture")
    context = info.get(f"{architecture}.context_length") if isinstance(architecture, str) else None
    size = item.get("size")
    return OllamaModel(
        tag=str(item["name"]),
        family=_text(details.get("family")),
        parameter_size=_text(details.get("parameter_size")),
        quantization=_text(details.get("quantization_level")),
        format=_text(details.get("format")),
        size_bytes=size if isinstance(size, int) and size > 0 else None,
        digest=_text(item.get("digest")),
        capabilities=(
            tuple(str(c).lower() for c in capabilities if isinstance(c, str))
            if isinstance(capabilities, list)
            else None
        ),
        context_length=context if isinstance(context, int) and context > 0 else None,
    )


def _section(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _text(value: object) -> str | None:
    return value.strip() or None if isinstance(value, str) else None
