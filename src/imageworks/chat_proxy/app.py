"""`create_app(settings)` builds the proxy; `imageworks-chat-proxy` runs it with uvicorn."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType

import uvicorn
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from imageworks.chat_proxy.command_line import environment_from_argv
from imageworks.chat_proxy.config import ProxySettings, SettingsError, load_settings
from imageworks.chat_proxy.dashboard import dashboard_routes
from imageworks.chat_proxy.draining import Drain
from imageworks.chat_proxy.guard import AccessGuard, startup_warnings
from imageworks.chat_proxy.model_router import ROUTER_ROUTES
from imageworks.chat_proxy.openapi import openapi_document
from imageworks.chat_proxy.protocol import InternalError, ProxyError, error_body, json_bytes
from imageworks.chat_proxy.restart import RestartControl, SocketHandover, listening_socket
from imageworks.chat_proxy.routes import API_ROUTES, CHAT_PATH, SCRAPE_ROUTES, ChatEndpoint
from imageworks.chat_proxy.services import running_services
from imageworks.chat_proxy.timing import ServerTiming, timing_headers
from imageworks.config import RegistrySettings
from imageworks.registry.errors import RegistryError
from imageworks.registry.store import RegistryStore

log = logging.getLogger("imageworks.chat_proxy")


VERSION = "0.1.0"


def create_app(settings: ProxySettings, registry: RegistrySettings | None = None) -> Starlette:
    registry_settings = registry or RegistrySettings()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with running_services(settings, registry_settings) as services:
            app.state.services = services
            yield

    routes = [*API_ROUTES, *ROUTER_ROUTES, *SCRAPE_ROUTES, *dashboard_routes()]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.version = VERSION
    # Set when the server begins to stop: long-lived streams (`/models/sse`) end then, so
    # they never hold up a shutdown or a restart.
    app.state.closing = asyncio.Event()
    app.state.restart = RestartControl(settings.restart_mode)
    # Written out (openapi.py): the chat route reads its body itself, so no generator sees it.
    app.state.openapi = json_bytes(openapi_document(VERSION))

    async def proxy_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ProxyError)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        body = error_body(str(exc.detail), type_, code=str(exc.status_code))
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    async def registry_error(_: Request, exc: Exception) -> JSONResponse:
        body = error_body(f"The model registry cannot be read: {exc}", "server_error")
        return JSONResponse(body, status_code=503)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not a client error: log it fully, answer in the OpenAI shape all the same.
        # (Chat completions never get here: their own owner records and answers them.)
        log.error("unhandled error", exc_info=exc)
        error = InternalError(f"Internal proxy error: {type(exc).__name__}")
        headers = timing_headers(request.scope)  # this answer bypasses the middleware
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    app.add_exception_handler(ProxyError, proxy_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RegistryError, registry_error)
    app.add_exception_handler(Exception, unexpected)
    # Starlette wraps each added middleware around the earlier ones: the chat fast path is
    # innermost, every route (the dashboard and metrics included) is behind the guard, and
    # Server-Timing, outermost, times every answer, the guard's refusals too.
    app.add_middleware(ChatFastPath)
    app.add_middleware(AccessGuard, settings=settings)
    app.add_middleware(ServerTiming)
    return app


# The collector runs when this many more containers were allocated than freed: about every 50
# requests instead of every 4 (CPython's 700). 20,000 was no faster and held ~1.5 MB more.
YOUNG_COLLECTION_THRESHOLD = 10_000


def settle_the_heap() -> None:
    """Once started: what start-up built (modules, schemas, the registry, the services) lives as
    long as the process, so it is frozen out of the cyclic collector's sight, and the youngest
    generation is collected less often. Profiled at 32 connections, the collector took a third
    of the proxy's CPU: a full collection walked every start-up object (~120 ms, the event loop
    stopped meanwhile) and a young one ran every seventh request."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle, old)


class ChatFastPath:
    """The hot path: a chat completion goes straight to its endpoint, past Starlette's
    exception middleware and router (the same endpoint the router would call: the route table
    alone would serve it right, only slower)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.chat = ChatEndpoint()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == CHAT_PATH and scope["method"] == "POST":
            await self.chat(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def main() -> int:
    # The flags are environment variables (command_line.py): set before any setting is read.
    os.environ.update(environment_from_argv(sys.argv[1:], version=VERSION))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # The request log (CHAT_PROXY_LOG_PATH) has a line per request; the operator log says what
    # an operator needs. httpx's line per upstream request (health polls included) and
    # uvicorn's access log (off below) would double every request and cost the hot path.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        settings = load_settings()
        registry = RegistrySettings()
    except SettingsError as exc:
        print(f"imageworks-chat-proxy: configuration error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        problem = exc.errors()[0]
        variable = "IMAGEWORKS_" + "_".join(str(p) for p in problem["loc"]).upper()
        print(
            f"imageworks-chat-proxy: configuration error: {variable}: {problem['msg']}",
            file=sys.stderr,
        )
        return 2
    logging.getLogger().setLevel(settings.log_level.upper())
    for warning in startup_warnings(settings):
        log.warning("%s", warning)
    try:  # a registry that cannot be read is one clear line, not a lifespan traceback
        RegistryStore(registry.registry_dir).load()
    except RegistryError as exc:
        print(f"imageworks-chat-proxy: {exc}", file=sys.stderr)
        return 1
    try:
        sock = listening_socket(settings.host, settings.port)
    except OSError as exc:
        print(
            f"imageworks-chat-proxy: cannot listen on {settings.host}:{settings.port}: "
            f"{exc.strerror or exc} (choose another with --host / --port, or set CHAT_PROXY_HOST / "
            "CHAT_PROXY_PORT)",
            file=sys.stderr,
        )
        return 1
    app = create_app(settings, registry)
    restart: RestartControl = app.state.restart
    handover = SocketHandover(sock)
    drain = Drain()  # what a connection does once shutdown begins (draining.py)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=drain.protocol,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=int(settings.vllm_stop_timeout_s) + 15,
    )
    server = _Server(config, drain, on_shutdown=lambda: _begin_shutdown(app, handover, server))

    def begin_restart() -> None:
        # A restart waits for the requests in flight as a swap does, however long they take.
        config.timeout_graceful_shutdown = int(settings.drain_timeout_s) + 15
        server.should_exit = True

    restart.attach(begin_restart)
    server.run(sockets=[sock])
    if restart.requested and not server.signalled:
        if restart.mode == "exec":
            handover.exec_again()  # does not return
        log.info("restart: exiting for the supervisor (Docker, systemd) to start the proxy again")
    handover.release()
    return 0


class _Server(uvicorn.Server):
    """uvicorn, settling the heap once the app has started, telling the connections (`drain`)
    and the app (see `_begin_shutdown`) the moment shutdown begins, and remembering whether a
    signal (not a restart) stopped it."""

    def __init__(
        self, config: uvicorn.Config, drain: Drain, *, on_shutdown: Callable[[], None]
    ) -> None:
        super().__init__(config)
        self._drain = drain
        self._on_shutdown = on_shutdown
        self.signalled = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.signalled = True
        super().handle_exit(sig, frame)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)  # the app's services are up
        settle_the_heap()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Before uvicorn tells the connections, so that one made meanwhile drains too.
        self._drain.begin()
        self._on_shutdown()
        await super().shutdown(sockets)


def _begin_shutdown(app: Starlette, handover: SocketHandover, server: _Server) -> None:
    """A stop answers the requests waiting for a model with a 503 at once, instead of holding
    the graceful shutdown until they time out; a restart serves them (they were accepted). Only
    a restart by exec keeps the listening socket: otherwise nobody would answer the connections
    that queue on it, so new ones are refused from now on."""
    app.state.closing.set()
    restart: RestartControl = app.state.restart
    restarting = restart.requested and not server.signalled
    if not (restarting and restart.mode == "exec"):
        handover.release()
    services = getattr(app.state, "services", None)  # None: start-up never completed
    if services is not None and not restarting:
        services.slot.begin_shutdown()
