"""The proxy's long-lived services, built in order at start-up and closed in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from imageworks.backends.autostart import Autostarter
from imageworks.backends.base import BackendNotReady
from imageworks.backends.external import ExternalBackend
from imageworks.backends.gpu import GpuSlot
from imageworks.backends.managed import (
    GpuEffects,
    GpuHolder,
    ManagedBackend,
    OllamaBackend,
    adopt_running_model,
)
from imageworks.backends.ollama import OllamaManager
from imageworks.backends.router import BackendRouter, LaunchSettings, launch_spec
from imageworks.backends.state import AdoptedProcess, StateFile
from imageworks.backends.supervisor import LaunchSpec, ManagedProcess
from imageworks.chat_proxy.catalog import Catalog
from imageworks.chat_proxy.chat import ChatRules, ChatService
from imageworks.chat_proxy.config import ProxySettings
from imageworks.chat_proxy.forwarding import Forwarder, new_client
from imageworks.chat_proxy.normalize.request import RequestRules
from imageworks.chat_proxy.normalize.vision import ImagePolicy
from imageworks.chat_proxy.observe import Metrics, RequestLog
from imageworks.config import RegistrySettings
from imageworks.registry.errors import RegistryError
from imageworks.registry.installed import HttpServedModels
from imageworks.registry.schema import RegistryEntry
from imageworks.registry.store import RegistryStore

log = logging.getLogger("imageworks.chat_proxy")


@dataclass
class Services:
    settings: ProxySettings
    started: float
    catalog: Catalog
    slot: GpuSlot[GpuHolder]
    chat: ChatService
    metrics: Metrics
    state_file: StateFile


@contextlib.asynccontextmanager
async def running_services(
    settings: ProxySettings, registry: RegistrySettings
) -> AsyncIterator[Services]:
    store = RegistryStore(registry.registry_dir)
    catalog = Catalog(
        store,
        settings,
        ollama_host=registry.ollama_host,
        served_source=HttpServedModels(registry.installed_check_timeout_s),
    )
    await catalog.view()  # fail start-up now if the registry cannot be read at all
    await asyncio.to_thread(_refresh_merged_file, store)

    launches = launch_settings(settings, registry.registry_dir)

    def spec_for(model: str) -> tuple[LaunchSpec, RegistryEntry]:
        entry = catalog.entry(model)
        if entry is None:
            raise BackendNotReady(f"{model}: no longer in the registry")
        return launch_spec(entry, launches), entry

    client = new_client()
    metrics = Metrics(settings.metrics_window_s)
    state_file = StateFile(settings.vllm_state_path)
    ollama_managers: dict[str, OllamaManager] = {}

    def ollama(root: str) -> OllamaManager:
        if root not in ollama_managers:
            timeout = min(settings.backend_timeout_s, 10.0)
            ollama_managers[root] = OllamaManager(root, client, request_timeout_s=timeout)
        return ollama_managers[root]

    effects = GpuEffects(
        spec_for,
        state_file,
        ollama,
        registry.ollama_host,
        start_timeout_s=settings.vllm_start_timeout_s,
        stop_timeout_s=settings.vllm_stop_timeout_s,
    )

    def idle_ttl(model: str) -> float | None:
        entry = catalog.entry(model)
        ttl = entry.ttl_s if entry is not None and entry.ttl_s else settings.idle_ttl_s
        return ttl or None

    slot: GpuSlot[GpuHolder] = GpuSlot(
        effects,
        drain_timeout_s=settings.drain_timeout_s,
        idle_ttl_s=idle_ttl,
        on_swap=lambda _model, seconds: metrics.record_swap(seconds),
    )
    if settings.vllm_single_port:
        adopted = await adopt_running_model(
            state_file,
            lambda name: catalog.entry(name) is not None,
            settings.vllm_port,
            stop_timeout_s=settings.vllm_stop_timeout_s,
            health_timeout_s=settings.vllm_health_timeout_s,
            client=client,
        )
        if adopted is not None:
            slot.adopt(*adopted)
    autostarter = (
        Autostarter(
            settings.autostart_map,
            grace_period_s=settings.autostart_grace_period_s,
            client=client,
            log_dir=settings.backend_log_dir,
        )
        if settings.autostart_enabled
        else None
    )
    router = BackendRouter(
        managed=ManagedBackend(slot),
        ollama=OllamaBackend(slot, registry.ollama_host, settings.loopback_alias),
        external=ExternalBackend(registry.ollama_host, settings.loopback_alias, autostarter),
        vllm_single_port=settings.vllm_single_port,
    )
    request_log = RequestLog(
        settings.log_path,
        settings.max_log_bytes,
        keep_files=settings.log_keep_files,
        log_prompts=settings.log_prompts,
    )
    request_log.start()
    forwarder = Forwarder(client, settings.backend_timeout_s, settings.stream_idle_timeout_s)
    chat = ChatService(catalog, router, forwarder, request_log, metrics, chat_rules(settings))
    refresher = asyncio.create_task(catalog.keep_installed_states_fresh())
    reaper = asyncio.create_task(slot.release_when_idle())
    try:
        yield Services(settings, time.monotonic(), catalog, slot, chat, metrics, state_file)
    finally:
        for task in (refresher, reaper):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if autostarter is not None:
            await autostarter.close()
        if settings.leave_model_running:
            log.info("leaving the model process running for the next proxy to adopt")
        else:
            await _stop_managed_model(slot, settings.vllm_stop_timeout_s)
        await client.aclose()
        await asyncio.to_thread(request_log.close)


async def _stop_managed_model(slot: GpuSlot[GpuHolder], stop_timeout_s: float) -> None:
    """The model process we hold must not outlive us (bounded: SIGKILL as a last resort)."""
    holder = slot.holder
    try:
        await asyncio.wait_for(slot.release(), timeout=stop_timeout_s + 20)
    except TimeoutError:
        if isinstance(holder, ManagedProcess | AdoptedProcess):
            log.warning("model process did not stop in time; killing it")
            holder.kill_now()


def launch_settings(settings: ProxySettings, registry_dir: Path) -> LaunchSettings:
    """How managed model servers are started (shared with `imageworks-loader activate-model`)."""
    return LaunchSettings(
        registry_dir=registry_dir,
        port=settings.vllm_port,
        log_dir=settings.backend_log_dir,
        gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
        max_model_len=settings.vllm_max_model_len,
        vllm_launcher=tuple(settings.vllm_launcher),
        llama_server_binary=settings.llama_server_binary,
    )


def chat_rules(settings: ProxySettings) -> ChatRules:
    normalize_tools = not settings.disable_tool_normalization
    return ChatRules(
        request=RequestRules(
            normalize_tools=normalize_tools,
            images=ImagePolicy(settings.max_image_bytes, settings.allow_remote_images),
            truncate_vision_history=settings.vision_truncate_history,
            keep_system=settings.vision_keep_system,
            keep_last_n_turns=settings.vision_keep_last_n_turns,
        ),
        require_template=settings.require_template,
        normalize_tools=normalize_tools,
        split_think_tags=settings.split_think_tags,
        log_prompts=settings.log_prompts,
        stream_heartbeat_s=settings.stream_heartbeat_s,
    )


def _refresh_merged_file(store: RegistryStore) -> None:
    try:
        store.refresh_merged_file()
    except (RegistryError, OSError) as exc:
        log.warning("could not update %s: %s", store.merged_path, exc)
