from __future__ import annotations

from typing import Any

import pytest

from imageworks.registry.endpoints import backend_root, ollama_tag, openai_base_url
from imageworks.registry.schema import RegistryEntry

OLLAMA_HOST = "http://ollama.example:11434"


def _entry(backend: str, **config: Any) -> RegistryEntry:
    return RegistryEntry.model_validate({"name": "m", "backend": backend, "backend_config": config})


@pytest.mark.parametrize(
    ("backend", "config", "root", "openai"),
    [
        ("vllm", {}, "http://127.0.0.1:8000", "http://127.0.0.1:8000/v1"),
        ("vllm", {"port": 24001}, "http://127.0.0.1:24001", "http://127.0.0.1:24001/v1"),
        (
            "vllm",
            {"host": "gpu-box", "port": 9000},
            "http://gpu-box:9000",
            "http://gpu-box:9000/v1",
        ),
        ("vllm", {"host": "https://gpu:8443"}, "https://gpu:8443", "https://gpu:8443/v1"),
        ("external", {"base_url": "http://lm:1234/v1/"}, "http://lm:1234", "http://lm:1234/v1"),
        ("ollama", {}, OLLAMA_HOST, OLLAMA_HOST + "/v1"),
        (
            "ollama",
            {"host": "imageworks-ollama", "port": 11434},
            "http://imageworks-ollama:11434",
            "http://imageworks-ollama:11434/v1",
        ),
        # an Ollama base_url ending in /api must not become /api/api/... (original bug W8)
        ("ollama", {"base_url": "http://o:11434/api"}, "http://o:11434", "http://o:11434/v1"),
    ],
)
def test_backend_urls_from_backend_config(
    backend: str, config: dict[str, Any], root: str, openai: str
) -> None:
    entry = _entry(backend, **config)
    assert backend_root(entry, OLLAMA_HOST) == root
    assert openai_base_url(entry, OLLAMA_HOST) == openai


@pytest.mark.parametrize(
    ("fields", "tag"),
    [
        ({"served_model_id": "qwen3:8b"}, "qwen3:8b"),
        ({"backend_config": {"model_path": "ollama:/phi4:14b"}}, "phi4:14b"),
        ({"served_model_id": "None", "backend_config": {"model_path": "ollama:llava"}}, "llava"),
        ({}, "m"),
    ],
)
def test_ollama_tag_prefers_served_id_then_model_path(fields: dict[str, Any], tag: str) -> None:
    entry = RegistryEntry.model_validate({"name": "m", "backend": "ollama", **fields})
    assert ollama_tag(entry) == tag
