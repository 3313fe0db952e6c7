"""Thin HTTP handlers: each one reads the request, asks a service, and returns its answer.

`API_ROUTES` and `SCRAPE_ROUTES` are the app's table. The model endpoints (chat, completions,
embeddings, responses) are plain ASGI apps (`ModelEndpoint`); `app.py` also puts the chat
completion in front of the router, so the hot path meets no routing, no request object and no
exception middleware."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from imageworks.backends.base import BackendNotReady
from imageworks.backends.endpoints import Endpoint
from imageworks.chat_proxy.overview import overview
from imageworks.chat_proxy.protocol import (
    MAX_JSON_DEPTH,
    BackendUnavailable,
    BodyTooLarge,
    InvalidRequest,
    NotFoundError,
    ProxyError,
    json_bytes,
    json_shape_problem,
)
from imageworks.chat_proxy.restart import RestartControl, RestartUnavailable
from imageworks.chat_proxy.services import Services, reload_registry
from imageworks.chat_proxy.sse import ClientGone, Reply
from imageworks.chat_proxy.timing import request_timing

CHAT_PATH = Endpoint.CHAT.path


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def _read_body(receive: Receive, declared: bytes | None, limit: int) -> bytes:
    """The body, read from the ASGI stream and counted as it arrives: beyond `limit` bytes it
    is a 413 at once (a Content-Length over it before a byte is read), and the rest is never
    read (the 413 closes the connection; uvicorn stops reading a socket whose buffer is full).
    `ClientGone` if the client leaves before it is all there."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone("the client left before its request body was read")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)  # one chunk, the usual body: that very object, no copy


def _content_length(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return bytes(value)
    return None


async def _request_body(request: Request, limit: int) -> bytes:
    return await _read_body(
        request.receive, request.headers.get("content-length", "").encode(), limit
    )


class ModelEndpoint:
    """A `POST` routed by its `model` (chat, completions, embeddings, responses), as a plain
    ASGI app: the body is read here, and the service's response runs the whole request (and
    stops it the moment the client leaves)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services: Services = scope["app"].state.services  # Starlette puts itself in the scope
        limit = services.settings.max_body_bytes
        try:
            body = await _read_body(receive, _content_length(scope), limit)
        except BodyTooLarge as error:
            services.chat.refused(error, self.endpoint)
            await Reply(send).fail(error)
            return
        except ClientGone:
            return  # nothing was accepted: there is no one to answer
        response = services.chat.handle(body, request_timing(scope), self.endpoint)
        await response(scope, receive, send)


class ChatEndpoint(ModelEndpoint):
    """`POST /v1/chat/completions` (app.py also serves it in front of the router)."""

    def __init__(self) -> None:
        super().__init__(Endpoint.CHAT)


async def health(request: Request) -> Response:
    services = _services(request)
    return _json(
        {
            "status": "ok",
            "uptime_s": round(time.monotonic() - services.started, 3),
            "registry_entries": services.catalog.entry_count(),
            "active_backend": services.slot.holder_model,
            "slot": services.slot.status(),
        }
    )


async def models(request: Request) -> Response:
    view = await _services(request).catalog.view()
    return Response(view.listing, media_type="application/json")


async def model(request: Request) -> Response:
    # The path arrives percent-decoded (`smollm2%20135m%20(Q4%201)`); ids may contain `/`.
    model_id: str = request.path_params["model_id"]
    catalog = _services(request).catalog
    return Response(catalog.model(await catalog.view(), model_id), media_type="application/json")


def _metrics_disabled() -> Response:
    error: ProxyError = NotFoundError(
        "Metrics are disabled; set CHAT_PROXY_ENABLE_METRICS=1 to enable them.",
        code="metrics_disabled",
    )
    return JSONResponse(error.body(), status_code=error.status)


async def metrics(request: Request) -> Response:
    services = _services(request)
    if not services.settings.enable_metrics:
        return _metrics_disabled()
    return _json({**services.metrics.snapshot(), "slot": services.slot.status()})


async def prometheus_metrics(request: Request) -> Response:
    prometheus = _services(request).prometheus
    if prometheus is None:
        return _metrics_disabled()
    return Response(prometheus.exposition(), headers={"content-type": CONTENT_TYPE_LATEST})


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


async def admin_status(request: Request) -> Response:
    return _json(await _admin_status(_services(request)))


async def admin_activate(request: Request) -> Response:
    """Load a model now (as a request for it would), and answer once it is ready."""
    services = _services(request)
    raw = await _request_body(request, services.settings.max_body_bytes) or b"{}"
    try:
        body = None if json_shape_problem(raw, MAX_JSON_DEPTH) else json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise InvalidRequest('The body must be {"model": "<name>"}.', param="model")
    await services.chat.activate(body["model"])
    return _json(await _admin_status(services))


async def admin_stop(request: Request) -> Response:
    """Stop the model holding the GPU once its requests have finished (requests arriving
    meanwhile wait behind the stop)."""
    services = _services(request)
    try:
        await services.slot.stop()
    except BackendNotReady as exc:  # the process survived the stop: the slot keeps it
        raise BackendUnavailable(str(exc), code="stop_failed") from exc
    return _json(await _admin_status(services))


async def admin_reload(request: Request) -> Response:
    """Re-read the registry now (edits are noticed within a second anyway): the answer says
    what was read, and a broken registry is a 503 naming the problem (the old one still serves)."""
    return _json(await reload_registry(_services(request)))


async def admin_restart(request: Request) -> Response:
    """Drain, stop the model (unless CHAT_PROXY_LEAVE_MODEL_RUNNING=1) and start afresh: by exec
    in the same process, or (CHAT_PROXY_RESTART_MODE=exit) by exiting for Docker or systemd."""
    restart: RestartControl = request.app.state.restart
    try:
        restart.request()
    except RestartUnavailable as exc:
        raise BackendUnavailable(str(exc), code="restart_unavailable") from exc
    return _json({"restarting": True, "mode": restart.mode}, status=202)


async def admin_overview(request: Request) -> Response:
    """Everything the dashboard at /ui shows, from memory."""
    services = _services(request)
    view = await services.catalog.view()
    state = request.app.state
    return _json(overview(services, view, state.restart, state.version))


def _json(data: Any, status: int = 200) -> Response:
    return Response(json_bytes(data), status_code=status, media_type="application/json")


# The API's routes, in the order of the OpenAPI document (openapi.py).
API_ROUTES: list[BaseRoute] = [
    Route("/v1/health", health, methods=["GET"]),
    Route("/v1/models", models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", model, methods=["GET"]),
    Route(CHAT_PATH, ChatEndpoint(), methods=["POST"]),
    *(
        Route(endpoint.path, ModelEndpoint(endpoint), methods=["POST"])
        for endpoint in (Endpoint.COMPLETIONS, Endpoint.EMBEDDINGS, Endpoint.RESPONSES)
    ),
    Route("/v1/metrics", metrics, methods=["GET"]),
    Route("/v1/openapi.json", openapi, methods=["GET"]),
    Route("/v1/admin/status", admin_status, methods=["GET"]),
    Route("/v1/admin/activate", admin_activate, methods=["POST"]),
    Route("/v1/admin/stop", admin_stop, methods=["POST"]),
    Route("/v1/admin/reload", admin_reload, methods=["POST"]),
    Route("/v1/admin/restart", admin_restart, methods=["POST"]),
    Route("/v1/admin/overview", admin_overview, methods=["GET"]),
]
# Beside the API, and not in its document: `/metrics` is where Prometheus looks by default.
SCRAPE_ROUTES: list[BaseRoute] = [
    Route("/metrics", prometheus_metrics, methods=["GET"], include_in_schema=False)
]
