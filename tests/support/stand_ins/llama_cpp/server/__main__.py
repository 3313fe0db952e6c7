"""`python -m llama_cpp.server` standing in for llama-cpp-python's server, without a model.

It behaves as the real server does in what the tests of our launcher rely on:

- it takes the flags our launcher passes (`--model --host --port --model_alias
  --interrupt_requests --n_ctx --chat_format --embedding`, booleans written `True`/`False`); an
  unknown flag, or a model file that does not exist, ends it with an error. `--n_ctx`,
  `--chat_format` and `--embedding` change nothing here (it has no embeddings endpoint);
- `/health` is a 404 (the real server has none), `/v1/models` lists the `--model_alias`;
- `/v1/chat/completions` generates for one request at a time, in arrival order. With
  `--interrupt_requests True` (the real default) a request that arrives cuts the running stream
  short: `[DONE]` before any finish_reason;
- a request its models reject (`top_k: "abc"`, or OpenAI's `json_schema` response_format, which
  it does not know) is a 500 whose message is FastAPI's dump of the validation errors;
- `{"type": "json_object", "schema": S}` is answered with the least JSON value S allows, where
  the real server's grammar would make the model write one;
- stream events are spaced JSON (Python's default) and never carry usage;
- on SIGTERM, uvicorn's graceful shutdown finishes the requests in progress, then it exits.

What it writes is always the same few words, one a token: assert structure, never text.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import uvicorn
from pydantic import BaseModel, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

WORDS = ("This", " is", " the", " llama-cpp-python", " stand-in", " answering", ".")
TOKEN_DELAY_S = 0.05  # a word every 50 ms: requests sent together overlap


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object"]
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")


class ChatRequest(BaseModel):
    """The fields of the real server's chat request model that matter here; others are ignored,
    as there."""

    messages: list[dict[str, Any]]
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 0.2
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    stream: bool = False
    stop: str | list[str] | None = None
    response_format: ResponseFormat | None = None


def least_value(schema: dict[str, Any]) -> Any:
    """The simplest JSON value `schema` allows (for the keywords tests use): every property of an
    object, an enum's first value, an empty string or list, `true`, `0`."""
    if "enum" in schema:
        return schema["enum"][0]
    kind = str(schema.get("type"))
    if kind == "object":
        properties = schema.get("properties", {})
        return {name: least_value(sub) for name, sub in properties.items()}
    return {"string": "", "boolean": True, "integer": 0, "number": 0, "array": []}.get(kind)


def answer(request: ChatRequest) -> tuple[list[str], str]:
    """The pieces of the answer to `request`, and its finish_reason."""
    shape = request.response_format
    if shape is not None and shape.type == "json_object":
        value = {} if shape.json_schema is None else least_value(shape.json_schema)
        return [json.dumps(value)], "stop"
    limit = request.max_tokens
    if limit is None or limit >= len(WORDS):
        return list(WORDS), "stop"
    return list(WORDS[: max(limit, 0)]), "length"


def server_error(message: str) -> dict[str, Any]:
    error = {"message": message, "type": "internal_server_error", "param": None, "code": None}
    return {"error": error}


def validation_dump(error: ValidationError, endpoint: str) -> str:
    """FastAPI's message for a request body its models reject, which the real server answers
    as a 500: the errors, each located in the `body`, then where the endpoint is defined."""
    errors = [{**one, "loc": ("body", *one["loc"])} for one in error.errors(include_url=False)]
    plural = "" if len(errors) == 1 else "s"
    code = StandIn.chat.__code__
    return "\n".join(
        [
            f"{len(errors)} validation error{plural}:",
            *(f"  {one}" for one in errors),
            "",
            f'  File "{code.co_filename}", line {code.co_firstlineno}, in {code.co_name}',
            f"    POST {endpoint}",
        ]
    )


class StandIn:
    """The ASGI app: one model, served to one request at a time."""

    def __init__(self, alias: str, *, interrupt_requests: bool) -> None:
        self.alias = alias
        self._interrupt_requests = interrupt_requests
        self._model = asyncio.Lock()  # held by the request being generated for
        self._waiting = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        route = (scope["method"], scope["path"])
        if route == ("POST", "/v1/chat/completions"):
            await self.chat(Request(scope, receive), send)
            return
        if route == ("GET", "/v1/models"):
            model = {"id": self.alias, "object": "model", "owned_by": "me", "permissions": []}
            response = JSONResponse({"object": "list", "data": [model]})
        else:  # `/health` among them
            response = JSONResponse({"detail": "Not Found"}, 404)
        await response(scope, receive, send)

    async def chat(self, request: Request, send: Send) -> None:
        try:
            body = ChatRequest.model_validate_json(await request.body())
        except ValidationError as error:
            message = validation_dump(error, request.url.path)
            await JSONResponse(server_error(message), 500)(request.scope, request.receive, send)
            return
        pieces, finish_reason = answer(body)
        async with self._turn():
            if body.stream:
                await self._stream(send, pieces, finish_reason)
                return
            await asyncio.sleep(TOKEN_DELAY_S * len(pieces))
            completion = self._completion(body, "".join(pieces), finish_reason, len(pieces))
            await JSONResponse(completion)(request.scope, request.receive, send)

    @contextlib.asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        self._waiting += 1
        try:
            await self._model.acquire()
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            self._model.release()

    def _completion(
        self, request: ChatRequest, text: str, finish_reason: str, tokens: int
    ) -> dict[str, Any]:
        prompt = sum(len(str(message.get("content", "")).split()) for message in request.messages)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        return {
            "id": f"chatcmpl-{uuid.uuid4()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.alias,
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": tokens,
                "total_tokens": prompt + tokens,
            },
        }

    async def _stream(self, send: Send, pieces: list[str], finish_reason: str) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        base = {
            "id": f"chatcmpl-{uuid.uuid4()}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.alias,
        }

        async def event(data: str) -> None:
            body = f"data: {data}\r\n\r\n".encode()
            await send({"type": "http.response.body", "body": body, "more_body": True})

        async def chunk(delta: dict[str, Any], finish: str | None = None) -> None:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            await event(json.dumps({**base, "choices": [choice]}))

        await chunk({"role": "assistant"})
        for piece in pieces:
            await asyncio.sleep(TOKEN_DELAY_S)
            if self._interrupt_requests and self._waiting:
                break  # the real server gives the model to the newcomer at once
            await chunk({"content": piece})
        else:
            await chunk({}, finish_reason)
        await event("[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def flag(value: str) -> bool:
    """A boolean flag's value, written as the real server's help shows it (`True`, `False`)."""
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {value!r}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m llama_cpp.server", description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model_alias")
    parser.add_argument("--interrupt_requests", type=flag, default=True)
    parser.add_argument("--n_ctx", type=int, default=2048)
    parser.add_argument("--chat_format")
    parser.add_argument("--embedding", type=flag, default=False)
    args = parser.parse_args(argv)
    if not args.model.is_file():
        parser.exit(1, f"Model path does not exist: {args.model}\n")
    alias = args.model_alias or str(args.model)
    print(f"llama-cpp-python stand-in ({__file__}): {alias} on {args.host}:{args.port}", flush=True)
    app = StandIn(alias, interrupt_requests=args.interrupt_requests)
    uvicorn.run(app, host=args.host, port=args.port, interface="asgi3", lifespan="off")


if __name__ == "__main__":
    main(sys.argv[1:])
