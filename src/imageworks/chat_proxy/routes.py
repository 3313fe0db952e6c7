"""Thin HTTP handlers: each one reads the request, asks a service, and returns its answer."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import JSONResponse, Response

from imageworks.backends.base import BackendNotReady
from imageworks.chat_proxy.overview import overview
from imageworks.chat_proxy.protocol import (
    MAX_JSON_DEPTH,
    BackendUnavailable,
    BodyTooLarge,
    InvalidRequest,
    NotFoundError,
    ProxyError,
    json_shape_problem,
)
from imageworks.chat_proxy.restart import RestartControl, RestartUnavailable
from imageworks.chat_proxy.services import Services, reload_registry
from imageworks.chat_proxy.timing import request_timing

router = APIRouter(prefix="/v1")
# Beside the API: `/metrics` is where Prometheus looks by default.
root_router = APIRouter()


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, read from the ASGI stream and counted as it arrives: beyond `limit` bytes it
    is a 413 at once (a Content-Length over it before a byte is read), and the rest is never
    read (the 413 closes the connection; uvicorn stops reading a socket whose buffer is full)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    services = _services(request)
    return {
        "status": "ok",
        "uptime_s": round(time.monotonic() - services.started, 3),
        "registry_entries": services.catalog.entry_count(),
        "active_backend": services.slot.holder_model,
        "slot": services.slot.status(),
    }


@router.get("/models")
async def models(request: Request) -> Response:
    view = await _services(request).catalog.view()
    return Response(view.listing, media_type="application/json")


@router.get("/models/{model_id:path}")
async def model(request: Request, model_id: str) -> Response:
    # The path arrives percent-decoded (`smollm2%20135m%20(Q4%201)`); ids may contain `/`.
    catalog = _services(request).catalog
    return Response(catalog.model(await catalog.view(), model_id), media_type="application/json")


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    services = _services(request)
    try:
        body = await _read_body(request, services.settings.max_body_bytes)
    except BodyTooLarge as error:
        services.chat.refused(error)
        raise
    # The response runs the whole request, and stops it the moment the client goes away.
    return services.chat.handle(body, request_timing(request.scope))


def _metrics_disabled() -> Response:
    error: ProxyError = NotFoundError(
        "Metrics are disabled; set CHAT_PROXY_ENABLE_METRICS=1 to enable them.",
        code="metrics_disabled",
    )
    return JSONResponse(error.body(), status_code=error.status)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    services = _services(request)
    if not services.settings.enable_metrics:
        return _metrics_disabled()
    return JSONResponse({**services.metrics.snapshot(), "slot": services.slot.status()})


# Not in the OpenAPI document: a scrape target, not part of the API (see prometheus.py).
@root_router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(request: Request) -> Response:
    prometheus = _services(request).prometheus
    if prometheus is None:
        return _metrics_disabled()
    return Response(prometheus.exposition(), headers={"content-type": CONTENT_TYPE_LATEST})


@router.get("/openapi.json")
async def openapi(request: Request) -> Response:
    document: bytes = request.app.state.openapi
    return Response(document, media_type="application/json")


# -- admin: the GPU slot, for `imageworks-loader activate-model/current-model` -----------------


async def _admin_status(services: Services) -> dict[str, Any]:
    def read_state() -> dict[str, Any] | None:
        with services.state_file.locked():
            state = services.state_file.read()
        return dataclasses.asdict(state) if state else None

    return {"slot": services.slot.status(), "state_file": await asyncio.to_thread(read_state)}


@router.get("/admin/status")
async def admin_status(request: Request) -> dict[str, Any]:
    return await _admin_status(_services(request))


@router.post("/admin/activate")
async def admin_activate(request: Request) -> Response:
    """Load a model now (as a request for it would), and answer once it is ready."""
    services = _services(request)
    raw = await _read_body(request, services.settings.max_body_bytes) or b"{}"
    try:
        body = None if json_shape_problem(raw, MAX_JSON_DEPTH) else json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise InvalidRequest('The body must be {"model": "<name>"}.', param="model")
    await services.chat.activate(body["model"])
    return JSONResponse(await _admin_status(services))


@router.post("/admin/stop")
async def admin_stop(request: Request) -> Response:
    """Stop the model holding the GPU once its requests have finished (requests arriving
    meanwhile wait behind the stop)."""
    services = _services(request)
    try:
        await services.slot.stop()
    except BackendNotReady as exc:  # the process survived the stop: the slot keeps it
        raise BackendUnavailable(str(exc), code="stop_failed") from exc
    return JSONResponse(await _admin_status(services))


@router.post("/admin/reload")
async def admin_reload(request: Request) -> Response:
    """Re-read the registry now (edits are noticed within a second anyway): the answer says
    what was read, and a broken registry is a 503 naming the problem (the old one still serves)."""
    return JSONResponse(await reload_registry(_services(request)))


@router.post("/admin/restart")
async def admin_restart(request: Request) -> Response:
    """Drain, stop the model (unless CHAT_PROXY_LEAVE_MODEL_RUNNING=1) and start afresh: by exec
    in the same process, or (CHAT_PROXY_RESTART_MODE=exit) by exiting for Docker or systemd."""
    restart: RestartControl = request.app.state.restart
    try:
        restart.request()
    except RestartUnavailable as exc:
        raise BackendUnavailable(str(exc), code="restart_unavailable") from exc
    return JSONResponse({"restarting": True, "mode": restart.mode}, status_code=202)


@router.get("/admin/overview")
async def admin_overview(request: Request) -> Response:
    """Everything the dashboard at /ui shows, from memory."""
    services = _services(request)
    view = await services.catalog.view()
    app = request.app
    return JSONResponse(overview(services, view, app.state.restart, app.version))
