"""A scripted OpenAI-protocol upstream for fault-injection tests.

`ScriptedUpstream` runs a real uvicorn server on 127.0.0.1 (a free port unless given one) in a
background thread with its own event loop. The `model` of a chat request picks the scenario (see
`SCENARIOS`); every scenario answers both `stream: true` and non-stream requests.

It also has the tokenizer endpoints of llama-server (`POST /apply-template`, `POST /tokenize`
with `content`) and vLLM (`POST /tokenize` with `messages` or `prompt`), with a scripted chat
template (`render_prompt`) and one token per whitespace-separated word (`count_tokens`); their
requests are recorded in `side_requests`.

`POST /v1/completions`, `/v1/embeddings` and `/v1/responses` answer by `model` too, from
`ENDPOINT_SCENARIOS` (echo; cut-short: a stream that ends cleanly but unfinished; crash: one
whose connection breaks; error-400); their paths are recorded in `paths`.

Every chat request runs under a supervisor that watches the connection: if the client goes
away before the response is complete, the scenario is cancelled and `disconnects` counts it.
On close, unfinished responses are ended (streams stop without `[DONE]`, a request that
got no answer yet gets a 503) so shutdown never waits on a hanging scenario.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import struct
import threading
import time
from collections.abc import Coroutine, Iterable
from types import TracebackType
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from support.threaded_server import ThreadedServer

JSON = dict[str, Any]

COMPLETIONS = (
    "echo",
    "gated",
    "crash",
    "hang",
    "slow",
    "function-call",
    "tool-calls",
    "think",
    "trickle",
    "cut-short",
    "early-done",
    "mute",
    "no-usage",
)
SCENARIOS = (*COMPLETIONS, "error-400", "error-500", "error-validation", "error-html")
# What `/v1/completions`, `/v1/embeddings` and `/v1/responses` answer, by `model` (embeddings
# are never streamed: their stream scenarios answer as echo does).
ENDPOINT_SCENARIOS = ("echo", "cut-short", "crash", "error-400")
ENDPOINT_PATHS = ("/v1/completions", "/v1/embeddings", "/v1/responses")
VECTOR = [0.25, -0.5, 1.0]
VECTOR_BASE64 = base64.b64encode(struct.pack("<3f", *VECTOR)).decode()
EMBEDDING_USAGE = {"prompt_tokens": 3, "total_tokens": 3}
RESPONSE_USAGE = {"input_tokens": 5, "output_tokens": 7, "total_tokens": 12}
ECHO_TEXT = "Hello from the scripted upstream."
ECHO_PIECES = ("Hello", " from", " upstream")
SLOW_PIECES = ("Slow", " and", " steady", ".")
THINK_PIECES = ("<thi", "nk>pondering", "</think>The answer", " is 4.")
TRICKLE_PIECES = tuple(f" word{i}" for i in range(8))
TRICKLE_DELAY_S = 0.03  # between pieces: a client can leave while the answer is being made
ARGUMENT_PIECES = ('{"city"', ': "Par', 'is"}')
ARGUMENTS = "".join(ARGUMENT_PIECES)  # {"city": "Paris"}
TOOL_CALLS = (("call_a", "get_weather"), ("call_b", "get_time"))
USAGE = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
ROLE_DELTA = {"role": "assistant", "content": ""}
ECHO_MESSAGE = {"role": "assistant", "content": ECHO_TEXT}
GATE_TIMEOUT = 30.0
TRUNCATED_JSON = b'{"id": "chatcmpl-x", "choi'
HTML_502 = (
    b"<html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1></body></html>"
)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> JSON:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


CONTEXT_ERROR = error_body(
    "This model's maximum context length is 2048 tokens. However, you requested 4096 tokens.",
    "invalid_request_error",
    "messages",
    "context_length_exceeded",
)
SERVER_ERROR = error_body("internal upstream failure", "server_error")
# What llama-cpp-python's server answers (HTTP 500) for a request its models reject: FastAPI's
# dump of the validation errors, then a traceback.
VALIDATION_ERROR = error_body(
    "1 validation error:\n  {'type': 'int_parsing', 'loc': ('body', 'top_k'), 'msg': 'Input "
    "should be a valid integer, unable to parse string as an integer', 'input': 'abc'}\n\n"
    '  File "llama_cpp/server/app.py", line 376, in create_chat_completion\n',
    "internal_server_error",
)


class _Reply:
    """Writes one HTTP response; each SSE event goes out as its own body message."""

    def __init__(self, send: Send, rid: str, model: str, include_usage: bool) -> None:
        self._send = send
        self.model = model
        self.include_usage = include_usage
        self._base = {"id": rid, "created": int(time.time()), "model": model}
        self.started = False
        self.finished = False

    async def _start(self, status: int, content_type: bytes, length: int | None = None) -> None:
        headers = [(b"content-type", content_type), (b"cache-control", b"no-cache")]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        self.started = True
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, status: int, content_type: bytes, body: bytes) -> None:
        await self._start(status, content_type, len(body))
        self.finished = True
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

    async def json(self, status: int, payload: JSON) -> None:
        await self.body(status, b"application/json", json.dumps(payload).encode())

    async def completion(
        self, message: JSON, finish_reason: str = "stop", *, usage: bool = True
    ) -> None:
        choice = {"index": 0, "message": message, "finish_reason": finish_reason}
        payload = {**self._base, "object": "chat.completion", "choices": [choice]}
        await self.json(200, {**payload, "usage": USAGE} if usage else payload)

    async def start_stream(self) -> None:
        await self._start(200, b"text/event-stream")

    async def event(self, data: str) -> None:
        if not self.started:
            await self.start_stream()
        body = f"data: {data}\n\n".encode()
        await self._send({"type": "http.response.body", "body": body, "more_body": True})

    async def chunk(self, delta: JSON, finish_reason: str | None = None) -> None:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        await self._chunk(choices=[choice])

    async def _chunk(self, **fields: Any) -> None:
        await self.event(json.dumps({**self._base, "object": "chat.completion.chunk", **fields}))

    async def stream(self, deltas: Iterable[JSON], finish_reason: str = "stop") -> None:
        """Role chunk, the given deltas, then the end of the stream."""
        await self.chunk(ROLE_DELTA)
        for delta in deltas:
            await self.chunk(delta)
        await self.finish_stream(finish_reason)

    async def finish_stream(self, finish_reason: str = "stop", *, usage: bool = True) -> None:
        await self.chunk({}, finish_reason)
        if self.include_usage and usage:
            await self._chunk(choices=[], usage=USAGE)
        await self.event("[DONE]")
        await self.end()

    async def end(self) -> None:
        self.finished = True
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})


async def _client_gone(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class ScriptedUpstream:
    """Context manager running the scripted OpenAI-compatible server; see the module docstring."""

    def __init__(self, port: int = 0) -> None:
        self.url = ""
        self._port = port
        self._cond = threading.Condition()
        self._requests: list[JSON] = []
        self._paths: list[str] = []  # of the requests to the other endpoints, in order
        self._side_requests: list[tuple[str, JSON]] = []
        self._headers: list[dict[str, str]] = []
        self._disconnects = 0
        self._gates: dict[str, asyncio.Event] = {}  # only touched on the server loop
        self._closing = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: ThreadedServer | None = None

    # ----------------------------------------------------------------- test-facing API
    @property
    def requests(self) -> list[JSON]:
        with self._cond:
            return list(self._requests)

    @property
    def paths(self) -> list[str]:
        """The path of each request to `/v1/completions`, `/v1/embeddings`, `/v1/responses`."""
        with self._cond:
            return list(self._paths)

    @property
    def side_requests(self) -> list[tuple[str, JSON]]:
        """(path, body) of each tokenizer endpoint request, in order."""
        with self._cond:
            return list(self._side_requests)

    @property
    def headers(self) -> list[dict[str, str]]:
        with self._cond:
            return list(self._headers)

    @property
    def disconnects(self) -> int:
        with self._cond:
            return self._disconnects

    def wait_for_request(self, n: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self._requests) >= n, timeout)

    def wait_for_disconnect(self, timeout: float, count: int = 1) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._disconnects >= count, timeout)

    async def wait_for_request_async(self, n: int, timeout: float) -> bool:
        return await asyncio.to_thread(self.wait_for_request, n, timeout)

    async def wait_for_disconnect_async(self, timeout: float, count: int = 1) -> bool:
        return await asyncio.to_thread(self.wait_for_disconnect, timeout, count)

    def release(self, name: str = "gate") -> None:
        """Open a gate (it stays open); safe from any thread or event loop."""
        if self._loop is None:
            raise RuntimeError("release() needs a running ScriptedUpstream")
        self._loop.call_soon_threadsafe(lambda: self._gate(name).set())

    # ----------------------------------------------------------------------- lifecycle
    def __enter__(self) -> ScriptedUpstream:
        self._runner = runner = ThreadedServer(self._app, "scripted upstream", port=self._port)
        self._loop = runner.loop
        self.url = runner.url
        self._closing = asyncio.Event()
        self._gates.clear()
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

    # ---------------------------------------------------------------------- the server
    def _gate(self, name: str) -> asyncio.Event:
        return self._gates.setdefault(name, asyncio.Event())

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        route = (scope["method"], scope["path"])
        if route == ("POST", "/v1/chat/completions"):
            await self._chat(Request(scope, receive), send)
            return
        if scope["method"] == "POST" and scope["path"] in ENDPOINT_PATHS:
            await self._endpoint(scope["path"], Request(scope, receive), send)
            return
        if route in (("POST", "/tokenize"), ("POST", "/apply-template")):
            response = await self._tokenizer(route[1], Request(scope, receive))
        elif route == ("GET", "/health"):
            response = JSONResponse({"status": "ok"})
        elif route == ("GET", "/v1/models"):
            models = [{"id": n, "object": "model", "owned_by": "scripted"} for n in SCENARIOS]
            response = JSONResponse({"object": "list", "data": models})
        else:
            response = JSONResponse(error_body("not found", "invalid_request_error"), 404)
        await response(scope, receive, send)

    async def _tokenizer(self, path: str, request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return JSONResponse(
                error_body("body must be a JSON object", "invalid_request_error"), 400
            )
        with self._cond:
            self._side_requests.append((path, body))
        if path == "/apply-template":  # llama-server
            return JSONResponse({"prompt": render_prompt(body.get("messages") or [])})
        if isinstance(body.get("content"), str):  # llama-server
            return JSONResponse({"tokens": list(range(count_tokens(body["content"])))})
        if isinstance(body.get("messages"), list):  # vLLM, chat template applied
            return JSONResponse({"count": count_tokens(render_prompt(body["messages"]))})
        if isinstance(body.get("prompt"), str):  # vLLM
            return JSONResponse({"count": count_tokens(body["prompt"])})
        return JSONResponse(error_body("nothing to tokenize", "invalid_request_error"), 400)

    async def _chat(self, request: Request, send: Send) -> None:
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            error = error_body("body must be a JSON object", "invalid_request_error")
            await JSONResponse(error, 400)(request.scope, request.receive, send)
            return
        with self._cond:
            self._requests.append(body)
            self._headers.append(dict(request.headers))
            number = len(self._requests)
            self._cond.notify_all()
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        model = str(body.get("model"))
        reply = _Reply(send, f"chatcmpl-scripted-{number}", model, include_usage)
        if model in SCENARIOS:
            scenario = getattr(self, "_" + model.replace("-", "_"))
            script = scenario(reply, body.get("stream") is True)
        else:
            script = _unknown(reply)
        await self._supervise(reply, script, request.receive)

    async def _endpoint(self, path: str, request: Request, send: Send) -> None:
        """`/v1/completions`, `/v1/embeddings`, `/v1/responses`: the scenario named by `model`."""
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            error = error_body("body must be a JSON object", "invalid_request_error")
            await JSONResponse(error, 400)(request.scope, request.receive, send)
            return
        with self._cond:
            self._requests.append(body)
            self._paths.append(path)
            self._headers.append(dict(request.headers))
            number = len(self._requests)
            self._cond.notify_all()
        model = str(body.get("model"))
        reply = _Reply(send, f"scripted-{number}", model, include_usage=False)
        stream = body.get("stream") is True and path != "/v1/embeddings"
        if model not in ENDPOINT_SCENARIOS:
            script = _unknown(reply)
        elif model == "error-400":
            script = reply.json(400, CONTEXT_ERROR)
        elif path == "/v1/completions":
            script = _completion(reply, model, stream)
        elif path == "/v1/embeddings":
            script = _embeddings(reply, body)
        else:
            script = _response(reply, model, stream)
        await self._supervise(reply, script, request.receive)

    async def _supervise(
        self, reply: _Reply, script: Coroutine[Any, Any, None], receive: Receive
    ) -> None:
        work = asyncio.ensure_future(script)
        gone = asyncio.ensure_future(_client_gone(receive))
        closing = asyncio.ensure_future(self._closing.wait())
        done, _ = await asyncio.wait((work, gone, closing), return_when=asyncio.FIRST_COMPLETED)
        for task in (work, gone, closing):
            task.cancel()
        await asyncio.gather(work, gone, closing, return_exceptions=True)
        if work in done:
            work.result()  # let uvicorn log a broken scenario
        elif gone in done and not reply.finished:
            with self._cond:
                self._disconnects += 1
                self._cond.notify_all()
        elif not reply.started:
            await reply.json(503, error_body("scripted upstream closing", "server_error"))
        elif not reply.finished:
            await reply.end()

    # --------------------------------------------------------------------- scenarios
    async def _echo(self, reply: _Reply, stream: bool) -> None:
        if stream:
            await reply.stream({"content": piece} for piece in ECHO_PIECES)
        else:
            await reply.completion(ECHO_MESSAGE)

    async def _gated(self, reply: _Reply, stream: bool) -> None:
        if stream:
            await reply.chunk(ROLE_DELTA)
            await reply.chunk({"content": ECHO_PIECES[0]})
        with contextlib.suppress(TimeoutError):  # carry on; the test will notice the delay
            await asyncio.wait_for(self._gate("gate").wait(), GATE_TIMEOUT)
        if not stream:
            await reply.completion(ECHO_MESSAGE)
            return
        for piece in ECHO_PIECES[1:]:
            await reply.chunk({"content": piece})
        await reply.finish_stream()

    async def _crash(self, reply: _Reply, stream: bool) -> None:
        if not stream:
            await reply.body(200, b"application/json", TRUNCATED_JSON)
            return
        await reply.chunk(ROLE_DELTA)
        await reply.chunk({"content": ECHO_PIECES[0]})
        # Returning without the final body message makes uvicorn close the connection in
        # the middle of the chunked body: the client sees an incomplete response.

    async def _hang(self, reply: _Reply, stream: bool) -> None:
        if stream:
            await reply.chunk(ROLE_DELTA)
        await asyncio.Event().wait()  # until the supervisor cancels us

    async def _slow(self, reply: _Reply, stream: bool) -> None:
        if not stream:
            await asyncio.sleep(2.0)
            await reply.completion(ECHO_MESSAGE)
            return
        await reply.chunk(ROLE_DELTA)
        for piece in SLOW_PIECES:
            await asyncio.sleep(0.5)
            await reply.chunk({"content": piece})
        await reply.finish_stream()

    async def _error_400(self, reply: _Reply, stream: bool) -> None:
        await reply.json(400, CONTEXT_ERROR)

    async def _error_500(self, reply: _Reply, stream: bool) -> None:
        await reply.json(500, SERVER_ERROR)

    async def _error_validation(self, reply: _Reply, stream: bool) -> None:
        await reply.json(500, VALIDATION_ERROR)

    async def _error_html(self, reply: _Reply, stream: bool) -> None:
        await reply.body(502, b"text/html; charset=utf-8", HTML_502)

    async def _function_call(self, reply: _Reply, stream: bool) -> None:
        if not stream:
            call = {"name": "get_weather", "arguments": ARGUMENTS}
            await reply.completion(
                {"role": "assistant", "content": None, "function_call": call}, "function_call"
            )
            return
        first = {"function_call": {"name": "get_weather", "arguments": ""}}
        pieces = [{"function_call": {"arguments": piece}} for piece in ARGUMENT_PIECES]
        await reply.stream([first, *pieces], "function_call")

    async def _tool_calls(self, reply: _Reply, stream: bool) -> None:
        if not stream:
            calls = [
                {"id": cid, "type": "function", "function": {"name": name, "arguments": ARGUMENTS}}
                for cid, name in TOOL_CALLS
            ]
            await reply.completion(
                {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
            )
            return
        deltas: list[JSON] = []
        for index, (cid, name) in enumerate(TOOL_CALLS):
            function = {"name": name, "arguments": ""}
            deltas.append({"index": index, "id": cid, "type": "function", "function": function})
            deltas += [{"index": index, "function": {"arguments": p}} for p in ARGUMENT_PIECES]
        await reply.stream(({"tool_calls": [delta]} for delta in deltas), "tool_calls")

    async def _think(self, reply: _Reply, stream: bool) -> None:
        if stream:
            await reply.stream({"content": piece} for piece in THINK_PIECES)
        else:
            await reply.completion({"role": "assistant", "content": "".join(THINK_PIECES)})

    async def _trickle(self, reply: _Reply, stream: bool) -> None:
        """Like a small model: the answer comes piece by piece, a little apart."""
        if not stream:
            await asyncio.sleep(TRICKLE_DELAY_S * len(TRICKLE_PIECES))
            await reply.completion({"role": "assistant", "content": "".join(TRICKLE_PIECES)})
            return
        await reply.chunk(ROLE_DELTA)
        for piece in TRICKLE_PIECES:
            await asyncio.sleep(TRICKLE_DELAY_S)
            await reply.chunk({"content": piece})
        await reply.finish_stream()

    async def _cut_short(self, reply: _Reply, stream: bool) -> None:
        """A stream that ends cleanly, but before any finish_reason and without [DONE]."""
        if not stream:
            await reply.completion(ECHO_MESSAGE)
            return
        await reply.chunk(ROLE_DELTA)
        await reply.chunk({"content": ECHO_PIECES[0]})
        await reply.end()

    async def _early_done(self, reply: _Reply, stream: bool) -> None:
        """A stream that says [DONE] before any choice had a finish_reason."""
        if not stream:
            await reply.completion(ECHO_MESSAGE)
            return
        await reply.chunk(ROLE_DELTA)
        await reply.chunk({"content": ECHO_PIECES[0]})
        await reply.event("[DONE]")
        await reply.end()

    async def _no_usage(self, reply: _Reply, stream: bool) -> None:
        """Like echo, but never with usage, even when the client asks for it."""
        if not stream:
            await reply.completion(ECHO_MESSAGE, usage=False)
            return
        await reply.chunk(ROLE_DELTA)
        for piece in ECHO_PIECES:
            await reply.chunk({"content": piece})
        await reply.finish_stream(usage=False)

    async def _mute(self, reply: _Reply, stream: bool) -> None:
        """Stream headers (for a stream), then nothing at all until the supervisor cancels us."""
        if stream:
            await reply.start_stream()
        await asyncio.Event().wait()


def render_prompt(messages: list[Any]) -> str:
    """The scripted chat template: `<|role|> content` per message, then the assistant's turn."""
    turns = [
        f"<|{message.get('role')}|> {message.get('content') or ''}"
        for message in messages
        if isinstance(message, dict)
    ]
    return "\n".join([*turns, "<|assistant|>"])


def count_tokens(text: str) -> int:
    """The scripted tokenizer: one token per whitespace-separated word."""
    return len(text.split())


async def _unknown(reply: _Reply) -> None:
    message = f"model '{reply.model}' does not exist"
    await reply.json(404, error_body(message, "invalid_request_error", "model", "model_not_found"))


async def _completion(reply: _Reply, model: str, stream: bool) -> None:
    """A prompt completion: the echo text whole, or its pieces as `text_completion` chunks."""
    base = {"id": f"cmpl-{model}", "object": "text_completion", "created": 0, "model": reply.model}

    def choice(text: str, finish_reason: str | None) -> JSON:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    if not stream:
        await reply.json(200, {**base, "choices": [choice(ECHO_TEXT, "stop")], "usage": USAGE})
        return
    for piece in ECHO_PIECES:
        await reply.event(json.dumps({**base, "choices": [choice(piece, None)]}))
    if model == "crash":
        return  # the connection breaks in the middle of the chunked body
    if model == "cut-short":
        await reply.end()  # a clean end, but no finish_reason and no [DONE]
        return
    await reply.event(json.dumps({**base, "choices": [choice("", "stop")]}))
    await reply.event("[DONE]")
    await reply.end()


async def _embeddings(reply: _Reply, body: JSON) -> None:
    """One vector (VECTOR, or VECTOR_BASE64 for `encoding_format: base64`) per input text."""
    given = body.get("input")
    count = len(given) if isinstance(given, list) and given and not isinstance(given[0], int) else 1
    vector: Any = VECTOR_BASE64 if body.get("encoding_format") == "base64" else VECTOR
    data = [{"object": "embedding", "index": i, "embedding": vector} for i in range(count)]
    payload = {"object": "list", "data": data, "model": reply.model, "usage": EMBEDDING_USAGE}
    await reply.json(200, payload)


def _response_object(reply: _Reply, status: str, text: str) -> JSON:
    message = {
        "type": "message",
        "id": "msg_scripted",
        "role": "assistant",
        "status": status,
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
    return {
        "id": "resp_scripted",
        "object": "response",
        "created_at": 0,
        "status": status,
        "model": reply.model,
        "output": [message] if text else [],
        "usage": RESPONSE_USAGE if status == "completed" else None,
    }


async def _response(reply: _Reply, model: str, stream: bool) -> None:
    """A Responses API answer: the echo text whole, or typed events ending response.completed."""
    if not stream:
        await reply.json(200, _response_object(reply, "completed", ECHO_TEXT))
        return
    sequence = itertools.count()

    async def send(kind: str, **fields: Any) -> None:
        data = {"type": kind, "sequence_number": next(sequence), **fields}
        body = f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()
        if not reply.started:
            await reply.start_stream()
        await reply._send({"type": "http.response.body", "body": body, "more_body": True})

    await send("response.created", response=_response_object(reply, "in_progress", ""))
    for piece in ECHO_PIECES:
        fields = {"item_id": "msg_scripted", "output_index": 0, "content_index": 0}
        await send("response.output_text.delta", delta=piece, **fields)
    if model == "crash":
        return  # the connection breaks in the middle of the chunked body
    if model == "cut-short":
        await reply.end()  # a clean end before response.completed
        return
    text = "".join(ECHO_PIECES)
    await send("response.completed", response=_response_object(reply, "completed", text))
    await reply.end()
