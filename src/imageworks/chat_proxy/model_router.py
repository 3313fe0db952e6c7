"""llama.cpp's router API, at the base URL without `/v1`, so a client that speaks to llama.cpp
in router mode (Open WebUI's llama.cpp connection) can see which model is warm and load and
unload models through the GPU slot:

    GET  /models          every listed model with its `status` (the `/v1/models` listing
                          itself: the same ids, the same bytes; reads never touch the slot)
    POST /models/load     {"model": id}: loaded through the slot as a chat request would load
                          it; answers {"success": true} once it is ready
    POST /models/unload   {"model": id}: stopped through the slot (after its requests) if it
                          holds it; {"success": true} once it is stopped
    GET  /models/sse      server-sent events, one per status change, starting with every
                          model's current status
    POST /chat/completions  the chat completion, as llama-server also serves it without `/v1`
                          (for a client that appends the path to the base URL as it is)

The answers follow llama.cpp's `tools/server/server-models.cpp`: `{"success": true}`; an
unknown model is a 404, unloading a model that is not running a 400 "model is not running".
Where we differ: errors are OpenAI-shaped like every other answer of the proxy (llama.cpp's
also carry `code` as a number); loading a model that is already loaded succeeds (llama.cpp
answers 400 "model is already running"), since a load only leases the slot; and a load answers
once the model is ready, not at once.

What load and unload mean for the entries the proxy does not start: an Ollama entry's holder
is its Ollama (loading it stops the model server and hands the GPU to Ollama; unloading it
asks Ollama to unload everything, as a swap does); an external server is someone else's, so a
load only checks it can be reached (or autostarts it, if a command is configured) and an
unload is refused with a 400 that says there is nothing to unload.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from imageworks.backends.base import BackendNotReady
from imageworks.backends.slot import Phase
from imageworks.chat_proxy.catalog import CatalogView
from imageworks.chat_proxy.model_status import holder_name
from imageworks.chat_proxy.protocol import (
    MAX_JSON_DEPTH,
    BackendUnavailable,
    BodyTooLarge,
    InvalidRequest,
    json_bytes,
    json_shape_problem,
    parse_json,
)
from imageworks.chat_proxy.routes import ChatEndpoint
from imageworks.chat_proxy.services import Services
from imageworks.chat_proxy.sse import Reply, TaskResponse

SUCCESS = b'{"success":true}'
STATUS_EVENT = "status_change"  # llama.cpp's event name for a model's status change


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def list_models(request: Request) -> Response:
    view = await _services(request).catalog.view()
    return Response(view.listing, media_type="application/json")


async def _requested_model(request: Request, services: Services) -> str:
    """The body's `model`, or a 400 naming it."""
    limit = services.settings.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    raw = await request.body()
    if len(raw) > limit:
        raise BodyTooLarge(limit)
    body: Any = None
    if raw and not json_shape_problem(raw, MAX_JSON_DEPTH):
        try:
            body = parse_json(raw)
        except ValueError:
            body = None
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str) or not model:
        raise InvalidRequest('The body must be {"model": "<name>"}.', param="model")
    return model


async def load_model(request: Request) -> Response:
    """Load the model through the slot, as a chat request for it would (the same names, the
    same errors: 404 for an unknown model, 503 naming why a start failed)."""
    services = _services(request)
    model = await _requested_model(request, services)
    await services.chat.activate(model)
    return Response(SUCCESS, media_type="application/json")


async def unload_model(request: Request) -> Response:
    """Stop the model if it holds the slot: its requests finish first, and requests arriving
    meanwhile wait behind the stop (then start whatever they want)."""
    services = _services(request)
    model = await _requested_model(request, services)
    catalog = services.catalog
    entry = catalog.resolve(await catalog.view(), model)
    holder = holder_name(entry, catalog.status_rules)
    if holder is None:
        raise InvalidRequest(
            f"{model!r} is served by a server the proxy does not start or stop: there is "
            "nothing to unload.",
            param="model",
            code="model_not_managed",
        )
    slot = services.slot.view()
    key = services.slot.current_key
    if slot.holder != holder or slot.phase not in (Phase.STARTING, Phase.READY) or key is None:
        raise InvalidRequest("model is not running", param="model", code="model_not_loaded")
    try:
        # Only that holder: a swap between the check above and the stop's turn has unloaded it.
        await services.slot.stop(only=key)
    except BackendNotReady as exc:  # the process survived the stop: the slot keeps it
        raise BackendUnavailable(str(exc), code="stop_failed") from exc
    return Response(SUCCESS, media_type="application/json")


# -- GET /models/sse ---------------------------------------------------------------------------


def status_events(previous: dict[str, bytes], view: CatalogView) -> Iterable[bytes]:
    """An SSE event for every listed model whose status differs from `previous` (which is
    updated): `data: {"model": id, "event": "status_change", "data": {"status": value, ...}}`,
    llama.cpp's event, its `data` our status object with `status` for llama.cpp's `value`."""
    for model_id, status in zip(view.listed_ids, view.statuses, strict=True):
        if previous.get(model_id) == status:
            continue
        previous[model_id] = status
        fields = json.loads(status)
        data = {"status": fields.pop("value"), **fields}
        if "step" in fields:  # how llama.cpp's clients read a load's progress
            data["progress"] = {"current": fields["step"]}
        event = {"model": model_id, "event": STATUS_EVENT, "data": data}
        yield b"data: " + json_bytes(event) + b"\n\n"


async def _next_change(
    services: Services, seen: int, closing: asyncio.Event, wait_s: float
) -> None:
    """Return when the slot has changed since version `seen`, the server is stopping, or
    `wait_s` has passed (time for a heartbeat), whichever comes first."""
    changed = asyncio.ensure_future(services.slot.changes.wait(seen))
    stopping = asyncio.ensure_future(closing.wait())
    try:
        await asyncio.wait({changed, stopping}, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        changed.cancel()
        stopping.cancel()


async def _stream(services: Services, closing: asyncio.Event) -> AsyncIterator[bytes]:
    """Every model's status, then each change as it happens (a slow client skips states it
    had no time for, it never slows the slot); a comment when nothing was written for a
    heartbeat interval keeps proxies from closing an idle stream. Ends when the server stops."""
    loop = asyncio.get_running_loop()
    sent: dict[str, bytes] = {}
    changes = services.slot.changes
    heartbeat_s = services.settings.stream_heartbeat_s
    yield b": models status\n\n"  # the headers go out at once
    written = loop.time()
    while not closing.is_set() and not changes.closed:
        seen = changes.version  # read before the view: a change after it wakes us at once
        view = await services.catalog.view()
        for event in status_events(sent, view):
            yield event
            written = loop.time()
        quiet_for = loop.time() - written
        if quiet_for >= heartbeat_s:
            yield b": ping\n\n"
            written, quiet_for = loop.time(), 0.0
        await _next_change(services, seen, closing, heartbeat_s - quiet_for)


async def models_sse(request: Request) -> Response:
    """The stream runs as one task, cancelled the moment the client leaves (`TaskResponse`)."""
    services = _services(request)
    closing: asyncio.Event = request.app.state.closing

    async def write(reply: Reply) -> None:
        async for chunk in _stream(services, closing):
            await reply.event(chunk)
        await reply.end()

    return TaskResponse(write)


# Outside the API's document (openapi.py), as `/metrics` is: these are llama.cpp's paths.
ROUTER_ROUTES: list[BaseRoute] = [
    Route("/models", list_models, methods=["GET"], include_in_schema=False),
    Route("/models/load", load_model, methods=["POST"], include_in_schema=False),
    Route("/models/unload", unload_model, methods=["POST"], include_in_schema=False),
    Route("/models/sse", models_sse, methods=["GET"], include_in_schema=False),
    Route("/chat/completions", ChatEndpoint(), methods=["POST"], include_in_schema=False),
]
