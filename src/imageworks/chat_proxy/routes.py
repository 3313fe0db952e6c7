"""Thin HTTP handlers: each one reads the request, asks a service, and returns its answer."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from imageworks.chat_proxy.protocol import NotFoundError, ProxyError
from imageworks.chat_proxy.services import Services

router = APIRouter(prefix="/v1")


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


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


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Any:
    body = await request.body()

    async def client_gone() -> None:
        # After the body is read, the next ASGI message is the disconnect (or never comes).
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return await _services(request).chat.handle(body, client_gone)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    services = _services(request)
    if not services.settings.enable_metrics:
        error: ProxyError = NotFoundError(
            "Metrics are disabled; set CHAT_PROXY_ENABLE_METRICS=1 to enable them.",
            code="metrics_disabled",
        )
        return JSONResponse(error.body(), status_code=error.status)
    return JSONResponse({**services.metrics.snapshot(), "slot": services.slot.status()})
