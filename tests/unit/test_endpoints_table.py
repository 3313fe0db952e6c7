"""Which endpoints an entry serves, what a client lacking one is told, and the launch flags
that make a server answer embeddings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from imageworks.backends.base import Dialect
from imageworks.backends.endpoints import (
    Endpoint,
    is_embedding_entry,
    launcher_dialect,
    served_endpoints,
    unserved_message,
)
from imageworks.backends.llamacpp import LlamaCppPython, LlamaServer
from imageworks.backends.vllm import vllm_argv
from imageworks.registry.schema import RegistryEntry

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = Path("/m/model.gguf")
SERVER = LlamaServer(Path("/bin/llama-server"))
PYTHON = LlamaCppPython(python="/venv/bin/python")
CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES = tuple(Endpoint)


def _entry(backend: str = "llamacpp", **fields: Any) -> RegistryEntry:
    return RegistryEntry.model_validate({"name": "m", "backend": backend, **fields})


EMBEDDER = {"roles": ["embedding"]}


@pytest.mark.parametrize(
    "fields",
    [{"roles": ["embedding"]}, {"roles": ["Embed"]}, {"capabilities": {"text-embedding": True}}],
    ids=["role", "role-synonym", "capability-synonym"],
)
def test_embedding_entries_are_told_by_role_or_capability(fields: dict[str, Any]) -> None:
    assert is_embedding_entry(_entry(**fields))


def test_a_chat_entry_is_not_an_embedding_entry() -> None:
    assert not is_embedding_entry(_entry(roles=["chat"], capabilities={"embedding": False}))


@pytest.mark.parametrize(
    ("backend", "launcher", "expected"),
    [
        ("llamacpp", Dialect.LLAMA_SERVER, (CHAT, COMPLETIONS, RESPONSES)),
        ("llamacpp", Dialect.LLAMA_CPP_PYTHON, (CHAT, COMPLETIONS)),
        ("vllm", Dialect.LLAMA_SERVER, (CHAT, COMPLETIONS, RESPONSES)),
        ("ollama", Dialect.LLAMA_SERVER, (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES)),
        ("external", Dialect.LLAMA_SERVER, (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES)),
    ],
)
def test_generating_entries_serve_what_their_server_has(
    backend: str, launcher: Dialect, expected: tuple[Endpoint, ...]
) -> None:
    assert served_endpoints(_entry(backend), launcher) == expected


@pytest.mark.parametrize("backend", ["llamacpp", "vllm", "ollama"])
def test_embedding_entries_serve_embeddings_only(backend: str) -> None:
    for launcher in (Dialect.LLAMA_SERVER, Dialect.LLAMA_CPP_PYTHON):
        assert served_endpoints(_entry(backend, **EMBEDDER), launcher) == (EMBEDDINGS,)


def test_an_external_embedding_entry_serves_every_endpoint() -> None:
    # Someone else's server: whatever it has, the proxy forwards.
    assert served_endpoints(_entry("external", **EMBEDDER), Dialect.LLAMA_SERVER) == tuple(Endpoint)


def test_launcher_names_map_to_their_server() -> None:
    assert launcher_dialect("llama-cpp-python") is Dialect.LLAMA_CPP_PYTHON
    assert launcher_dialect("llama-server") is Dialect.LLAMA_SERVER


def test_the_refusal_names_what_the_model_serves() -> None:
    assert unserved_message("smollm2 135m embed", CHAT, (EMBEDDINGS,)) == (
        "Model 'smollm2 135m embed' serves /v1/embeddings only; "
        "it does not serve /v1/chat/completions."
    )
    assert unserved_message("x", EMBEDDINGS, (CHAT, COMPLETIONS, RESPONSES)) == (
        "Model 'x' serves /v1/chat/completions, /v1/completions and /v1/responses; "
        "it does not serve /v1/embeddings."
    )


def test_llama_server_starts_an_embedding_entry_for_embeddings_with_its_pooling() -> None:
    entry = _entry(backend_config={"pooling": "mean"}, **EMBEDDER)
    argv = SERVER.argv(entry, MODEL, None, host="127.0.0.1", port=1)
    assert "--embeddings" in argv
    assert argv[argv.index("--pooling") + 1] == "mean"


def test_llama_server_starts_a_chat_entry_without_embeddings() -> None:
    argv = SERVER.argv(_entry(backend_config={"pooling": "mean"}), MODEL, None, host="h", port=1)
    assert "--embeddings" not in argv
    assert "--pooling" not in argv


def test_extra_args_override_the_pooling() -> None:
    config = {"pooling": "mean", "extra_args": ["--pooling", "cls"]}
    argv = SERVER.argv(_entry(backend_config=config, **EMBEDDER), MODEL, None, host="h", port=1)
    assert argv.count("--pooling") == 1
    assert argv[-2:] == ["--pooling", "cls"]


def test_llama_cpp_python_starts_an_embedding_entry_with_embedding_on() -> None:
    argv = PYTHON.argv(_entry(**EMBEDDER), MODEL, None, host="127.0.0.1", port=1)
    assert argv[argv.index("--embedding") + 1] == "True"
    assert "--embedding" not in PYTHON.argv(_entry(), MODEL, None, host="h", port=1)


def test_vllm_runs_an_embedding_entry_on_its_pooling_runner(tmp_path: Path) -> None:
    entry = _entry(
        "vllm", download_path=str(tmp_path), backend_config={"pooling": "cls"}, **EMBEDDER
    )
    argv = vllm_argv(
        entry,
        registry_dir=tmp_path,
        host="127.0.0.1",
        port=1,
        gpu_memory_utilization=0.5,
        max_model_len=None,
        launcher=("vllm",),
    )
    assert argv[argv.index("--runner") + 1] == "pooling"
    assert json.loads(argv[argv.index("--pooler-config") + 1]) == {"pooling_type": "CLS"}
    chat = _entry("vllm", download_path=str(tmp_path))
    plain = vllm_argv(
        chat,
        registry_dir=tmp_path,
        host="127.0.0.1",
        port=1,
        gpu_memory_utilization=0.5,
        max_model_len=None,
        launcher=("vllm",),
    )
    assert "--runner" not in plain


def test_the_demo_registry_has_an_embedding_entry_on_llama_server() -> None:
    demo = json.loads((REPO_ROOT / "configs" / "model_registry.curated.json").read_text())
    entries = [RegistryEntry.model_validate(raw) for raw in demo]
    (embedder,) = [entry for entry in entries if is_embedding_entry(entry)]
    assert embedder.backend == "llamacpp"
    argv = SERVER.argv(embedder, MODEL, None, host="127.0.0.1", port=1)
    assert "--embeddings" in argv
    assert argv[argv.index("--pooling") + 1] == "mean"
    assert served_endpoints(embedder, Dialect.LLAMA_SERVER) == (EMBEDDINGS,)
