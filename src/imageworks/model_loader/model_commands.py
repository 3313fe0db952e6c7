"""`activate-model` and `current-model`: the model server on the managed port, through the
running proxy when one answers, else through the state file (`activation.py` does the work)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from imageworks.backends.state import ManagedState, StateFile
from imageworks.chat_proxy.config import ProxySettings, SettingsError, load_settings
from imageworks.chat_proxy.launching import launch_settings
from imageworks.model_loader import report
from imageworks.model_loader.activation import (
    activate,
    admin_token,
    current,
    proxy_url,
    state_json,
    stop,
    via_proxy,
)
from imageworks.model_loader.context import Context
from imageworks.model_loader.errors import PROG, LoaderError


def _proxy_settings() -> ProxySettings:
    try:
        return load_settings()
    except SettingsError as exc:
        raise LoaderError(str(exc), "correct that variable or unset it") from exc


def activate_model(ctx: Context) -> None:
    args = ctx.args
    proxy = _proxy_settings()
    url, token = proxy_url(proxy), admin_token(proxy)
    if args.stop or args.name.lower() in ("none", "stop"):
        if url is not None:
            status = via_proxy(url, "POST", "/v1/admin/stop", token=token)
            ctx.emit({"proxy": url, **status}, lambda: _status_text(ctx, status, url, proxy))
            return
        stopped = stop(StateFile(proxy.vllm_state_path), proxy.vllm_stop_timeout_s)
        ctx.emit(state_json(stopped), lambda: _stopped_text(ctx, stopped, proxy))
        return
    entry = ctx.resolve(args.name)
    if url is not None:
        status = via_proxy(url, "POST", "/v1/admin/activate", {"model": entry.name}, token=token)
        ctx.emit({"proxy": url, **status}, lambda: _status_text(ctx, status, url, proxy))
        return
    if entry.backend not in ("vllm", "llamacpp"):
        raise LoaderError(
            f"{entry.name} is served by {entry.backend!r}, which {PROG} does not start",
            "start the proxy with `imageworks-chat-proxy`: it loads such models on demand",
        )
    if entry.backend == "vllm" and not proxy.vllm_single_port:
        raise LoaderError(
            f"{entry.name} is a vLLM entry, and CHAT_PROXY_VLLM_SINGLE_PORT=0 says its server "
            "is run by hand",
            "start it yourself, or set CHAT_PROXY_VLLM_SINGLE_PORT=1",
        )
    launches = launch_settings(proxy, ctx.store.directory)
    state = activate(entry, proxy, launches, ctx.settings.ollama_host)
    ctx.emit(state_json(state), lambda: _record_text(ctx, state, proxy))


def current_model(ctx: Context) -> None:
    proxy = _proxy_settings()
    url = proxy_url(proxy)
    if url is not None:
        status = via_proxy(url, "GET", "/v1/admin/status", token=admin_token(proxy))
        ctx.emit({"proxy": url, **status}, lambda: _status_text(ctx, status, url, proxy))
        return
    state = current(StateFile(proxy.vllm_state_path))
    ctx.emit(state_json(state), lambda: _record_text(ctx, state, proxy))


def _status_text(ctx: Context, status: dict[str, Any], url: str, proxy: ProxySettings) -> str:
    now = datetime.now(UTC)
    return report.describe_status(status, url=url, port=proxy.vllm_port, names=ctx.display, now=now)


def _record_text(ctx: Context, state: ManagedState | None, proxy: ProxySettings) -> str:
    source = f"the state file {proxy.vllm_state_path} (no proxy answers on port {proxy.port})"
    now = datetime.now(UTC)
    return report.describe_record(
        state, port=proxy.vllm_port, source=source, names=ctx.display, now=now
    )


def _stopped_text(ctx: Context, stopped: ManagedState | None, proxy: ProxySettings) -> str:
    if stopped is None:
        return f"No model was running on port {proxy.vllm_port}.\n"
    label = ctx.display(stopped.entry) or stopped.entry
    return f"Stopped {label} ({stopped.entry}, pid {stopped.pid}).\n" + report.nothing_active(
        proxy.vllm_port
    )
