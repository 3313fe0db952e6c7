"""An ASGI app served by uvicorn on 127.0.0.1, in a background thread with its own event loop,
so sync and async tests alike can talk to it over real HTTP."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable

import uvicorn
from uvicorn._types import ASGIApplication


class ThreadedServer:
    def __init__(
        self, app: ASGIApplication, name: str, *, port: int = 0, lifespan: str = "off"
    ) -> None:
        # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets; without it each
        # keep-alive response stalls ~40 ms on delayed ACKs.
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", port))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        config = uvicorn.Config(
            app,
            interface="asgi3",  # uvicorn cannot tell for a bound method
            lifespan=lifespan,  # type: ignore[arg-type]
            access_log=False,
            log_level="warning",
        )
        self._server = uvicorn.Server(config)
        self.loop = asyncio.new_event_loop()
        self._name = name
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def start(self, timeout_s: float = 30.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{self._name} did not start")
            time.sleep(0.01)

    def stop(self, before: Callable[[], None] | None = None, timeout_s: float = 60.0) -> None:
        """Stop serving; `before` runs on the server's loop first (e.g. to end hanging work)."""
        if before is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(before)
        self._server.should_exit = True
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout=5)

    def _serve(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._server.serve(sockets=[self._socket]))
            leftovers = asyncio.all_tasks(loop)
            for task in leftovers:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
        finally:
            self._socket.close()
            loop.close()
