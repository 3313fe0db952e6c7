"""The proxy's long-lived services, built in order at start-up and closed in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from imageworks.backends.base import BackendNotReady
from imageworks.backends.external import ExternalBackend
from imageworks.backends.gpu import GpuSlot
from imageworks.backends.managed import ManagedBackend, ProcessEffects
from imageworks.backends.router import BackendRouter, LaunchSettings, launch_spec
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
from imageworks.registry.store import RegistryStore

log = logging.getLogger("imageworks.chat_proxy")


@dataclass
class Services:
    settings: ProxySettings
    started: float
    catalog: Catalog
    slot: GpuSlot[ManagedProcess]
    chat: ChatService
    metrics: Metrics


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

    launches = LaunchSettings(
        registry_dir=registry.registry_dir,
        port=settings.vllm_port,
        log_dir=settings.backend_log_dir,
        gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
        max_model_len=settings.vllm_max_model_len,
    )

    def spec_for(model: str) -> LaunchSpec:
        entry = catalog.entry(model)
        if entry is None:
            raise BackendNotReady(f"{model}: no longer in the registry")
        return launch_spec(entry, launches)

    metrics = Metrics(settings.metrics_window_s)
    effects = ProcessEffects(
        spec_for,
        start_timeout_s=settings.vllm_start_timeout_s,
        stop_timeout_s=settings.vllm_stop_timeout_s,
    )
    slot: GpuSlot[ManagedProcess] = GpuSlot(
        effects, on_swap=lambda _model, seconds: metrics.record_swap(seconds)
    )
    router = BackendRouter(
        managed=ManagedBackend(slot),
        external=ExternalBackend(registry.ollama_host, settings.loopback_alias),
        vllm_single_port=settings.vllm_single_port,
    )
    request_log = RequestLog(
        settings.log_path,
        settings.max_log_bytes,
        keep_files=settings.log_keep_files,
        log_prompts=settings.log_prompts,
    )
    request_log.start()
    client = new_client()
    forwarder = Forwarder(client, settings.backend_timeout_s, settings.stream_idle_timeout_s)
    chat = ChatService(catalog, router, forwarder, request_log, metrics, chat_rules(settings))
    refresher = asyncio.create_task(catalog.keep_installed_states_fresh())
    try:
        yield Services(settings, time.monotonic(), catalog, slot, chat, metrics)
    finally:
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refresher
        await _stop_managed_model(slot, settings.vllm_stop_timeout_s)
        await client.aclose()
        await asyncio.to_thread(request_log.close)


async def _stop_managed_model(slot: GpuSlot[ManagedProcess], stop_timeout_s: float) -> None:
    """The model process we started must not outlive us (bounded: SIGKILL as a last resort)."""
    holder = slot.holder
    try:
        await asyncio.wait_for(slot.release(), timeout=stop_timeout_s + 20)
    except TimeoutError:
        if holder is not None:
            log.warning("model process did not stop in time; killing it")
            holder.kill_now()


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
    )


def _refresh_merged_file(store: RegistryStore) -> None:
    try:
        store.refresh_merged_file()
    except (RegistryError, OSError) as exc:
        log.warning("could not update %s: %s", store.merged_path, exc)
