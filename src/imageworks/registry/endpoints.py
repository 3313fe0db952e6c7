"""Where an entry's backend listens, derived from its `backend_config` alone (pure)."""

from __future__ import annotations

from urllib.parse import urlsplit

from imageworks.registry.schema import RegistryEntry

# Ports a backend listens on when the entry does not say.
DEFAULT_PORTS = {"ollama": 11434, "vllm": 8000, "llamacpp": 8080}
DEFAULT_HOST = "127.0.0.1"


def _with_scheme(host: str) -> str:
    return host if host.startswith(("http://", "https://")) else f"http://{host}"


def backend_root(entry: RegistryEntry, ollama_host: str) -> str:
    """The backend's root URL without an API path, e.g. `http://127.0.0.1:11434`.

    Precedence: `base_url`, then `host` (a full URL, or a name completed with the port), then
    for Ollama entries the configured Ollama host."""
    config = entry.backend_config
    if config.base_url:
        root = config.base_url.rstrip("/")
        # Entries point at Ollama's native root, its `/api`, or its OpenAI `/v1`: all one server.
        for suffix in ("/v1", "/api"):
            if root.endswith(suffix):
                root = root[: -len(suffix)]
        return root
    port = config.port or DEFAULT_PORTS.get(entry.backend, 8000)
    if config.host:
        url = _with_scheme(config.host.rstrip("/"))
        return url if urlsplit(url).port is not None else f"{url}:{port}"
    if entry.backend == "ollama":
        return _with_scheme(ollama_host.rstrip("/"))
    return f"http://{DEFAULT_HOST}:{port}"


def openai_base_url(entry: RegistryEntry, ollama_host: str) -> str:
    """The OpenAI-protocol base URL (ending in `/v1`) of the entry's backend."""
    config = entry.backend_config
    if config.base_url and not config.base_url.rstrip("/").endswith("/api"):
        return config.base_url.rstrip("/")
    return backend_root(entry, ollama_host) + "/v1"


def ollama_tag(entry: RegistryEntry) -> str:
    """The Ollama model tag: the served id, else the `ollama:/<tag>` model path, else the name."""
    if entry.served_id:
        return entry.served_id
    path = entry.backend_config.model_path.strip()
    if path.lower().startswith("ollama:"):
        return path.split(":", 1)[1].lstrip("/")
    return entry.name
