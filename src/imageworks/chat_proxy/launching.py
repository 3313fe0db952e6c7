"""How managed model servers are started, from the settings: shared by the proxy and
`imageworks-loader activate-model`. Imports config and backends only (no web wiring), so the
loader does not pull in the web stack to start a model."""

from __future__ import annotations

from pathlib import Path

from imageworks.backends.llamacpp import LlamaCppPython, LlamaLauncher, find_llama_server
from imageworks.backends.router import LaunchSettings
from imageworks.backends.safe_mode import SafeModeMemory, default_memory_path
from imageworks.chat_proxy.config import ProxySettings


def launch_settings(settings: ProxySettings, registry_dir: Path) -> LaunchSettings:
    """Call once per process start: it looks for the llama-server binary."""
    return LaunchSettings(
        registry_dir=registry_dir,
        port=settings.vllm_port,
        log_dir=settings.backend_log_dir,
        gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
        max_model_len=settings.vllm_max_model_len,
        llamacpp=llamacpp_launcher(settings),
        vllm_launcher=tuple(settings.vllm_launcher),
    )


def llamacpp_launcher(settings: ProxySettings) -> LlamaLauncher:
    if settings.llamacpp_launcher == "llama-cpp-python":
        return LlamaCppPython()  # CHAT_PROXY_LLAMA_SERVER_BINARY does not apply
    return find_llama_server(settings.llama_server_binary)


def safe_mode_memory(settings: ProxySettings) -> SafeModeMemory:
    """Which server binaries start in safe mode here (CHAT_PROXY_SAFE_MODE), shared by every
    proxy and loader of this user."""
    return SafeModeMemory(default_memory_path(), settings.safe_mode)
