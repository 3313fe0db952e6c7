from __future__ import annotations

from typing import Any

import pytest

from imageworks.backends.base import Dialect
from imageworks.backends.external import external_target, rewrite_loopback
from imageworks.registry.schema import RegistryEntry


@pytest.mark.parametrize(
    ("url", "alias", "expected"),
    [
        ("http://127.0.0.1:8000/v1", "host.docker.internal", "http://host.docker.internal:8000/v1"),
        ("http://localhost:11434", "host.docker.internal", "http://host.docker.internal:11434"),
        ("http://[::1]:9000/v1", "gateway", "http://gateway:9000/v1"),
        ("http://user:pw@127.0.0.1:8000/v1", "gw", "http://user:pw@gw:8000/v1"),
        ("http://127.0.0.1:8000/v1", "gw:9999", "http://gw:9999/v1"),  # the alias's port wins
        ("http://gpu-box:8000/v1", "host.docker.internal", "http://gpu-box:8000/v1"),
        ("http://127.0.0.1:8000/v1", None, "http://127.0.0.1:8000/v1"),
    ],
)
def test_rewrite_loopback(url: str, alias: str | None, expected: str) -> None:
    assert rewrite_loopback(url, alias) == expected


def _entry(backend: str, **fields: Any) -> RegistryEntry:
    return RegistryEntry.model_validate({"name": "m", "backend": backend, **fields})


def test_external_target_uses_served_id_and_alias() -> None:
    entry = _entry(
        "vllm", served_model_id="qwen", backend_config={"host": "127.0.0.1", "port": 8001}
    )
    target = external_target(entry, "http://127.0.0.1:11434", "host.docker.internal")
    assert target.base_url == "http://host.docker.internal:8001/v1"
    assert target.model == "qwen"
    assert target.label == "vllm:m"


def test_ollama_target_is_its_openai_endpoint_with_the_tag() -> None:
    entry = _entry("ollama", backend_config={"model_path": "ollama:/phi4:14b"})
    target = external_target(entry, "http://imageworks-ollama:11434", None)
    assert target.base_url == "http://imageworks-ollama:11434/v1"
    assert target.model == "phi4:14b"


@pytest.mark.parametrize(
    ("backend", "dialect"),
    [("vllm", Dialect.VLLM), ("ollama", Dialect.OLLAMA), ("external", Dialect.OPENAI)],
)
def test_external_target_says_which_server_answers(backend: str, dialect: Dialect) -> None:
    entry = _entry(backend, backend_config={"base_url": "http://127.0.0.1:8001/v1"})
    assert external_target(entry, "http://127.0.0.1:11434", None).dialect is dialect
