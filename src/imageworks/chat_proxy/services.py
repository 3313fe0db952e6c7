"""The proxy's long-lived services, built in order at start-up and closed in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

from imageworks.backends.autostart import Autostarter
from imageworks.backends.base import BackendNotReady
from imageworks.backends.endpoints import launcher_dialect
from imageworks.backends.external import ExternalBackend
from imageworks.backends.gpu import GpuSlot
from imageworks.backends.managed import (
    GpuEffects,
    LaunchPlan,
    ManagedBackend,
    OllamaBackend,
    Slot,
    find_running_server,
)
from imageworks.backends.ollama import OllamaManager
from imageworks.backends.procfs import parent_pid
from imageworks.backends.router import BackendRouter, launch_spec
from imageworks.backends.slot import Rules
from imageworks.backends.state import StateFile
from imageworks.chat_proxy.catalog import Catalog
from imageworks.chat_proxy.chat import ChatRules, ChatService
from imageworks.chat_proxy.config import ProxySettings
from imageworks.chat_proxy.forwarding import Forwarder, new_session
from imageworks.chat_proxy.launching import launch_settings, safe_mode_memory
from imageworks.chat_proxy.normalize.request import RequestRules
from imageworks.chat_proxy.normalize.vision import ImagePolicy
from imageworks.chat_proxy.observe import Metrics, RequestLog
from imageworks.chat_proxy.prometheus import PrometheusMetrics
from imageworks.chat_proxy.restart import restarted_by_exec
from imageworks.config import RegistrySettings
from imageworks.registry.entry_cache import PerEntry
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
    slot: Slot
    chat: ChatService
    metrics: Metrics
    state_file: StateFile
    store: RegistryStore
    prometheus: PrometheusMetrics | None = None  # None: metrics are disabled
    started_at: float = field(default_factory=time.time)  # epoch seconds
    # New on every start: how a dashboard tells that a restart has completed.
    boot_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@contextlib.asynccontextmanager
async def running_services(
    settings: ProxySettings, registry: RegistrySettings
) -> AsyncIterator[Services]:
    store = RegistryStore(registry.registry_dir)
    catalog = Catalog(
        store,
        settings,
        ollama_host=registry.ollama_host,
        # Remote entries name the variable holding their key (`api_key_env`); the values are
        # looked up in the proxy's environment when used, and never copied anywhere else.
        served_source=HttpServedModels(registry.installed_check_timeout_s, environ=os.environ),
    )
    await catalog.view()  # fail start-up now if the registry cannot be read at all
    await asyncio.to_thread(_refresh_merged_file, store)

    launches = launch_settings(settings, registry.registry_dir)
    plans: PerEntry[LaunchPlan] = PerEntry()

    def plan_for(entry: RegistryEntry) -> LaunchPlan:
        """How `entry` is launched (BackendNotReady if it cannot be), once per entry object:
        a registry reload makes new entries, and with them new plans."""
        plan = plans.get(entry)
        if plan is None:
            plan = plans.put(entry, LaunchPlan(entry, launch_spec(entry, launches)))
        return plan

    def plan_named(name: str) -> LaunchPlan | None:
        entry = catalog.entry(name)
        if entry is None:
            return None
        try:
            return plan_for(entry)
        except BackendNotReady:
            return None

    def idle_ttl(entry: RegistryEntry) -> float | None:
        return entry.ttl_s or settings.idle_ttl_s or None

    # httpx for the calls beside the chat path (Ollama's model list, autostart health checks)
    client = httpx.AsyncClient(trust_env=False)
    metrics = Metrics(settings.metrics_window_s)
    state_file = StateFile(settings.vllm_state_path)
    ollama_managers: dict[str, OllamaManager] = {}

    def ollama(root: str) -> OllamaManager:
        if root not in ollama_managers:
            timeout = min(settings.backend_timeout_s, 10.0)
            ollama_managers[root] = OllamaManager(root, client, request_timeout_s=timeout)
        return ollama_managers[root]

    effects = GpuEffects(
        state_file,
        ollama,
        registry.ollama_host,
        start_timeout_s=settings.vllm_start_timeout_s,
        stop_timeout_s=settings.vllm_stop_timeout_s,
        health_timeout_s=settings.vllm_health_timeout_s,
        safe_mode=safe_mode_memory(settings),
    )
    prometheus = (
        PrometheusMetrics(
            slot_status=lambda: slot.status(),  # read at scrape time, once the slot exists
            in_flight=lambda: metrics.in_flight,
        )
        if settings.enable_metrics
        else None
    )

    def swapped(model: str, seconds: float) -> None:
        metrics.record_swap(seconds)
        if prometheus is not None:
            prometheus.swap_finished(model, seconds)

    slot: Slot = GpuSlot(
        effects,
        Rules(drain_timeout_s=settings.drain_timeout_s, queue_timeout_s=settings.queue_timeout_s),
        on_swap=swapped,
    )
    slot.open()
    catalog.watch_slot(slot.view)  # the models' status in the listings
    background: list[asyncio.Task[None]] = []
    if settings.vllm_single_port:
        try:
            adoption = await find_running_server(state_file, plan_named, settings.vllm_port)
        except (OSError, TimeoutError) as exc:  # starts will fail with the same reason, clearly
            log.warning("cannot read the state file %s: %s", state_file.path, exc)
            adoption = None
        if adoption is not None:
            if restarted_by_exec() and parent_pid(adoption.process.pid) == os.getpid():
                adoption.process.inherited_by_exec()
            ttl = idle_ttl(adoption.plan.entry) if adoption.plan is not None else None
            slot.adopt(
                adoption.key,
                adoption.plan,
                adoption.process,
                idle_ttl_s=ttl,
                serve=adoption.servable,
            )
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
        managed=ManagedBackend(slot, plan_for, idle_ttl),
        ollama=OllamaBackend(slot, registry.ollama_host, settings.loopback_alias),
        external=ExternalBackend(
            registry.ollama_host,
            settings.loopback_alias,
            autostarter,
            environ=os.environ,
            outage=catalog.outage,
        ),
        vllm_single_port=settings.vllm_single_port,
    )
    request_log = RequestLog(
        settings.log_path,
        settings.max_log_bytes,
        keep_files=settings.log_keep_files,
        log_prompts=settings.log_prompts,
    )
    request_log.start()
    session = new_session()  # the chat path's own client (see forwarding.py)
    forwarder = Forwarder(session, settings.backend_timeout_s, settings.stream_idle_timeout_s)
    chat = ChatService(
        catalog, router, forwarder, request_log, metrics, chat_rules(settings), prometheus
    )
    background.append(asyncio.create_task(catalog.keep_installed_states_fresh()))
    try:
        yield Services(
            settings, time.monotonic(), catalog, slot, chat, metrics, state_file, store, prometheus
        )
    finally:
        for task in background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if autostarter is not None:
            await autostarter.close()
        if settings.leave_model_running:
            log.info("leaving the model process running for the next proxy to adopt")
        # Bounded: past it the model process is killed (SIGKILL) rather than left behind.
        await slot.close(
            stop_holder=not settings.leave_model_running,
            timeout_s=settings.vllm_stop_timeout_s + 20,
        )
        await session.close()
        await client.aclose()
        await asyncio.to_thread(request_log.close)


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
        requested_model_in_answers=settings.response_model == "requested",
        llamacpp_dialect=launcher_dialect(settings.llamacpp_launcher),
    )


async def reload_registry(services: Services) -> dict[str, object]:
    """`POST /v1/admin/reload`: re-read the registry now and rewrite the merged file."""
    view = await services.catalog.reload()
    await asyncio.to_thread(_refresh_merged_file, services.store)
    return {
        "entries": len(view.snapshot),
        "listed": view.listed,
        "warnings": list(view.snapshot.warnings),
    }


def _refresh_merged_file(store: RegistryStore) -> None:
    try:
        store.refresh_merged_file()
    except (RegistryError, OSError) as exc:
        log.warning("could not update %s: %s", store.merged_path, exc)
