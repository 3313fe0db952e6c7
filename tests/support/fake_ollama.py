"""A fake Ollama server with real load/unload state, for the proxy's GPU-coordination tests.

`FakeOllama` runs uvicorn on 127.0.0.1 in a background thread with its own event loop and
speaks enough of Ollama's HTTP API: `/api/version`, `/api/tags` (installed models), `/api/show`
(one model's details and capabilities), `/api/ps`
(loaded models), `/api/generate` (preload, generate, or unload with `keep_alive: 0` and no
prompt), `/api/chat` (NDJSON stream unless `"stream": false`, tool calls with object
arguments, images recorded) and the OpenAI-compatible `/v1/models` and `/v1/chat/completions`.

Every chat or generate request for an installed model loads it. An unloaded model leaves
`/api/ps` `unload_delay_s` after the unload request. Names without a tag mean `:latest`.
All requests are recorded; the test-facing properties return thread-safe snapshots.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from support.threaded_server import ThreadedServer

JSON = dict[str, Any]
Call = tuple[str, str, Any]

VERSION = "0.12.0"
REPLY_PIECES = ("Hello", " from", " fake Ollama.")
REPLY_TEXT = "".join(REPLY_PIECES)
TOOL_ARGUMENTS: JSON = {"city": "Paris"}
STATS: JSON = {"total_duration": 12_000_000, "prompt_eval_count": 5, "eval_count": 7}
USAGE = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
MODEL_SIZE = 5_000_000_000
KEEP_ALIVE_S = 300


def tag(name: str) -> str:
    """Ollama's full name for a model: `qwen3` is `qwen3:latest`."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def dead_url() -> str:
    """The URL of a loopback port nobody listens on (a "down" Ollama)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _is_zero(keep_alive: object) -> bool:
    """`keep_alive` 0, 0.0, "0", "0s", "0m": unload now."""
    if isinstance(keep_alive, str):
        keep_alive = keep_alive.strip().rstrip("hms")
    return keep_alive is not False and keep_alive in (0, "0", "0.0")


def _model_info(name: str) -> JSON:
    family = name.rsplit("/", 1)[-1].split(":")[0]
    details = {"format": "gguf", "family": family, "families": [family]}
    details |= {"parent_model": "", "parameter_size": "8B", "quantization_level": "Q4_K_M"}
    digest = hashlib.sha256(name.encode()).hexdigest()
    return {"name": name, "model": name, "size": MODEL_SIZE, "digest": digest, "details": details}


# What real Ollama's /api/show lists under `capabilities` (it derives them from the model's
# template, projector and architecture): qwen3 has tools and thinking, llava vision, and an
# embedding model only "embedding". Other families here are plain completion models.
_CAPABILITIES = {
    "qwen3": ["completion", "tools", "thinking"],
    "llava": ["completion", "vision"],
}
CONTEXT_LENGTH = 32768
PARAMETER_COUNT = 8_030_261_248


def _show(name: str) -> JSON:
    """Real Ollama's /api/show answer, the parts a client reads: details, model_info (GGUF
    header keys: the architecture, its parameter count and context length) and capabilities."""
    info = _model_info(name)
    family = info["details"]["family"]
    capabilities = ["embedding"] if "embed" in family else _CAPABILITIES.get(family, ["completion"])
    model_info = {
        "general.architecture": family,
        "general.parameter_count": PARAMETER_COUNT,
        f"{family}.context_length": CONTEXT_LENGTH,
    }
    return {
        "modelfile": f"FROM {name}\n",
        "parameters": "",
        "template": "{{ .Prompt }}",
        "details": info["details"],
        "model_info": model_info,
        "capabilities": capabilities,
        "modified_at": _now(),
    }


def _ndjson(objects: Iterable[JSON]) -> StreamingResponse:
    async def lines() -> AsyncIterator[bytes]:
        for obj in objects:
            yield json.dumps(obj).encode() + b"\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _sse(payloads: Iterable[JSON]) -> StreamingResponse:
    async def events() -> AsyncIterator[bytes]:
        for payload in payloads:
            yield f"data: {json.dumps(payload)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def _tool_name(body: JSON) -> str:
    tools = body.get("tools")
    if isinstance(tools, list) and tools and isinstance(tools[0], dict):
        function = tools[0].get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return str(function["name"])
    return "tool"


class FakeOllama:
    """Context manager running the fake Ollama; see the module docstring."""

    def __init__(
        self,
        installed: Iterable[str] = ("qwen3:8b", "llava:7b"),
        unload_delay_s: float = 0.0,
        port: int = 0,
    ) -> None:
        self.installed = tuple(tag(name) for name in installed)
        self.url = ""
        self._port = port
        self._lock = threading.Lock()
        self._unload_delay = unload_delay_s
        self._loaded: dict[str, float] = {}  # name -> wall-clock expiry shown in /api/ps
        self._unloading: dict[str, float] = {}  # name -> monotonic time it leaves /api/ps
        self._calls: list[Call] = []
        self._unload_requests: list[str] = []
        self._chat_requests: list[JSON] = []
        self._images: list[str] = []
        self._hanging = False
        self._closing = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: ThreadedServer | None = None

    # ----------------------------------------------------------------- test-facing API
    @property
    def loaded(self) -> set[str]:
        with self._lock:
            self._prune()
            return set(self._loaded)

    @property
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    @property
    def unload_requests(self) -> list[str]:
        with self._lock:
            return list(self._unload_requests)

    @property
    def chat_requests(self) -> list[JSON]:
        with self._lock:
            return list(self._chat_requests)

    @property
    def images(self) -> list[str]:
        """Every base64 image of every /api/chat message, in order."""
        with self._lock:
            return list(self._images)

    def load(self, name: str) -> None:
        """Pretend another client loaded `name` (it need not be installed)."""
        with self._lock:
            self._unloading.pop(tag(name), None)
            self._loaded.setdefault(tag(name), time.time() + KEEP_ALIVE_S)

    def set_unload_delay(self, seconds: float) -> None:
        with self._lock:
            self._unload_delay = seconds

    def stop_answering(self) -> None:
        """Requests from now on are recorded, then hang until `close()` (which ends them 503)."""
        with self._lock:
            self._hanging = True

    # ----------------------------------------------------------------------- lifecycle
    def __enter__(self) -> FakeOllama:
        self._runner = runner = ThreadedServer(self._app, "fake Ollama", port=self._port)
        self._loop = runner.loop
        self.url = runner.url
        self._closing = asyncio.Event()
        self._hanging = False
        runner.start(timeout_s=10)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._runner is None:
            return
        self._runner.stop(before=self._closing.set, timeout_s=5)
        self._runner = self._loop = None

    # --------------------------------------------------------------------- model state
    def _prune(self) -> None:  # caller holds the lock
        now = time.monotonic()
        for name, when in list(self._unloading.items()):
            if when <= now:
                del self._unloading[name]
                self._loaded.pop(name, None)

    def _unload(self, requested: str) -> None:
        name = tag(requested)
        with self._lock:
            self._unload_requests.append(requested)
            if self._unload_delay <= 0:
                self._loaded.pop(name, None)
                self._unloading.pop(name, None)
            elif name in self._loaded and name not in self._unloading:
                self._unloading[name] = time.monotonic() + self._unload_delay

    # ---------------------------------------------------------------------- the server
    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        raw = await Request(scope, receive).body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        method, path = scope["method"], scope["path"]
        with self._lock:
            self._calls.append((method, path, body))
            hanging = self._hanging
            if path in ("/api/chat", "/v1/chat/completions") and isinstance(body, dict):
                self._chat_requests.append(body)
                if path == "/api/chat":
                    for message in body.get("messages") or []:
                        images = message.get("images") if isinstance(message, dict) else None
                        if isinstance(images, list):
                            self._images += images
        if hanging:
            await self._closing.wait()
            response: Response = JSONResponse({"error": "fake Ollama is closing"}, 503)
        else:
            response = self._route(method, path, body)
        await response(scope, receive, send)

    def _route(self, method: str, path: str, body: Any) -> Response:
        if method == "GET" and path == "/":
            return PlainTextResponse("Ollama is running")
        if method == "GET" and path == "/api/version":
            return JSONResponse({"version": VERSION})
        if method == "GET" and path == "/api/tags":
            models = [{**_model_info(n), "modified_at": _now()} for n in self.installed]
            return JSONResponse({"models": models})
        if method == "GET" and path == "/api/ps":
            with self._lock:
                self._prune()
                loaded = list(self._loaded.items())
            models = [
                {**_model_info(name), "expires_at": _iso(expiry), "size_vram": MODEL_SIZE}
                for name, expiry in loaded
            ]
            return JSONResponse({"models": models})
        if method == "GET" and path == "/v1/models":
            data = [
                {"id": n, "object": "model", "created": 0, "owned_by": "library"}
                for n in self.installed
            ]
            return JSONResponse({"object": "list", "data": data})
        if method == "POST" and path == "/api/show":
            # Ollama takes `model` (older clients send `name`); an unknown one is a 404.
            wanted = body.get("model") or body.get("name") if isinstance(body, dict) else None
            if not isinstance(wanted, str) or tag(wanted) not in self.installed:
                return JSONResponse({"error": f"model '{wanted}' not found"}, 404)
            return JSONResponse(_show(tag(wanted)))
        if method != "POST" or path not in ("/api/generate", "/api/chat", "/v1/chat/completions"):
            return PlainTextResponse("404 page not found", 404)
        openai = path.startswith("/v1/")
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(body, dict) or not isinstance(model, str) or not model:
            return _error(openai, 400, "model is required")
        if tag(model) not in self.installed:
            return _error(openai, 404, f"model '{model}' not found")
        if openai:
            return self._openai_chat(body, model)
        return self._native(body, model, "message" if path == "/api/chat" else "response")

    def _answered(self, body: JSON, model: str) -> None:
        """Load the model for a request; `keep_alive: 0` unloads it again afterwards."""
        self.load(model)
        if _is_zero(body.get("keep_alive")):
            self._unload(model)

    def _native(self, body: JSON, model: str, field: str) -> Response:
        """/api/generate (`field` "response") and /api/chat (`field` "message")."""
        head = {"model": model, "created_at": _now()}
        chat = field == "message"
        empty: Any = {"role": "assistant", "content": ""} if chat else ""
        if not body.get("messages" if chat else "prompt"):  # a bare load or unload request
            unload = _is_zero(body.get("keep_alive"))
            if unload:
                self._unload(model)
            else:
                self.load(model)
            reason = "unload" if unload else "load"
            return JSONResponse({**head, field: empty, "done": True, "done_reason": reason})
        self._answered(body, model)
        pieces: list[Any] = list(REPLY_PIECES)
        whole: Any = REPLY_TEXT
        if chat and body.get("tools"):
            call = {"function": {"name": _tool_name(body), "arguments": TOOL_ARGUMENTS}}
            whole = {**empty, "tool_calls": [call]}
            pieces = [whole]
        elif chat:
            whole = {**empty, "content": REPLY_TEXT}
            pieces = [{**empty, "content": piece} for piece in REPLY_PIECES]
        final = {**head, "done": True, "done_reason": "stop", **STATS}
        if body.get("stream") is False:
            return JSONResponse({**final, field: whole})
        lines = [{**head, field: piece, "done": False} for piece in pieces]
        return _ndjson([*lines, {**final, field: empty}])

    def _openai_chat(self, body: JSON, model: str) -> Response:
        self._answered(body, model)
        with self._lock:
            number = len(self._chat_requests)
        base: JSON = {"id": f"chatcmpl-{number}", "created": int(time.time()), "model": model}
        base["system_fingerprint"] = "fp_ollama"
        message: JSON = {"role": "assistant", "content": REPLY_TEXT}
        deltas: list[JSON] = [{"role": "assistant", "content": piece} for piece in REPLY_PIECES]
        finish = "stop"
        if body.get("tools"):
            function = {"name": _tool_name(body), "arguments": json.dumps(TOOL_ARGUMENTS)}
            call = {"id": "call_1", "index": 0, "type": "function", "function": function}
            message = {"role": "assistant", "content": "", "tool_calls": [call]}
            deltas, finish = [message], "tool_calls"
        if body.get("stream") is not True:
            choice = {"index": 0, "message": message, "finish_reason": finish}
            return JSONResponse(
                {**base, "object": "chat.completion", "choices": [choice], "usage": USAGE}
            )
        choices: list[JSON] = [{"index": 0, "delta": d, "finish_reason": None} for d in deltas]
        end = {"role": "assistant", "content": ""}
        choices.append({"index": 0, "delta": end, "finish_reason": finish})
        chunks = [{**base, "object": "chat.completion.chunk", "choices": [c]} for c in choices]
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            chunks.append({**chunks[-1], "choices": [], "usage": USAGE})
        return _sse(chunks)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def _error(openai: bool, status: int, message: str) -> JSONResponse:
    if openai:
        error = {"message": message, "type": "api_error", "param": None, "code": None}
        return JSONResponse({"error": error}, status)
    return JSONResponse({"error": message}, status)
