"""Which backend serves an entry, and how a managed entry is launched."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imageworks.backends.base import Backend, BackendNotReady
from imageworks.backends.llamacpp import LlamaLauncher, llamacpp_launch
from imageworks.backends.supervisor import LaunchSpec
from imageworks.backends.vllm import DEFAULT_LAUNCHER, vllm_launch
from imageworks.registry.schema import KNOWN_BACKENDS, RegistryEntry


@dataclass(frozen=True, slots=True)
class LaunchSettings:
    """Everything a managed launch needs besides the entry."""

    registry_dir: Path
    port: int
    log_dir: Path
    gpu_memory_utilization: float
    max_model_len: int | None  # vLLM's --max-model-len for every entry (overrides theirs)
    llamacpp: LlamaLauncher  # the llama.cpp server, found once (`llamacpp.find_llama_server`)
    vllm_launcher: tuple[str, ...] = DEFAULT_LAUNCHER


def launch_spec(entry: RegistryEntry, settings: LaunchSettings) -> LaunchSpec:
    """How to start `entry`'s server; BackendNotReady if it cannot be (weights missing...)."""
    if entry.backend == "llamacpp":
        return llamacpp_launch(
            entry,
            registry_dir=settings.registry_dir,
            port=settings.port,
            log_dir=settings.log_dir,
            launcher=settings.llamacpp,
        )
    if entry.backend == "vllm":
        return vllm_launch(
            entry,
            registry_dir=settings.registry_dir,
            port=settings.port,
            log_dir=settings.log_dir,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            max_model_len=settings.max_model_len,
            launcher=settings.vllm_launcher,
        )
    raise BackendNotReady(f"{entry.name}: backend {entry.backend!r} is not started by the proxy")


class BackendRouter:
    def __init__(
        self, *, managed: Backend, ollama: Backend, external: Backend, vllm_single_port: bool
    ) -> None:
        self._managed = managed
        self._ollama = ollama
        self._external = external
        self._vllm_single_port = vllm_single_port

    def is_managed(self, entry: RegistryEntry) -> bool:
        return entry.backend == "llamacpp" or (entry.backend == "vllm" and self._vllm_single_port)

    def backend_for(self, entry: RegistryEntry) -> Backend:
        if self.is_managed(entry):
            return self._managed
        if entry.backend == "ollama":
            return self._ollama
        if entry.backend in KNOWN_BACKENDS:
            return self._external
        raise BackendNotReady(
            f"{entry.name}: backend {entry.backend!r} is not supported "
            f"(use one of: {', '.join(KNOWN_BACKENDS)})"
        )
