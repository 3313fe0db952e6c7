"""The endpoints forwarded as the backend answers them: `/v1/completions`, `/v1/embeddings` and
`/v1/responses`, each a `Flow` of the one owner's pipeline (`chat.py`).

Nothing in their bodies is normalized but `model` (the served id on the way in; in answers, the
name the client asked for, as for chat, except in the Responses API, relayed byte for byte).
How a stream ends is each API's own, and so is how a client learns that it did not:

- completions: `data:` chunks, then `data: [DONE]`. A stream that ends before any choice had a
  `finish_reason` gets chat's error event, `data: {"error": ...}`, and `[DONE]`.
- responses: typed events (`event: response.output_text.delta` ...), ending with
  `response.completed` (or `response.incomplete` / `response.failed`), and no `[DONE]`. A stream
  that ends before one of those gets the API's own `event: error` (`type`, `code`, `message`,
  `param`, `sequence_number`), which its clients parse as the stream's error.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from imageworks.backends.base import Target
from imageworks.backends.endpoints import Endpoint
from imageworks.chat_proxy.chat_flow import DONE_EVENTS, TemplateGate, observe_chunk
from imageworks.chat_proxy.endpoint_requests import (
    CompletionRequest,
    EmbeddingRequest,
    EndpointRequest,
    ResponsesRequest,
    wire_json,
)
from imageworks.chat_proxy.exchange import Exchange, usage_of
from imageworks.chat_proxy.forwarding import Completion, Forwarder, UpstreamStream
from imageworks.chat_proxy.normalize.request import SAMPLING_FIELDS
from imageworks.chat_proxy.normalize.response import ModelRenamer
from imageworks.chat_proxy.normalize.stream import backend_error, finishes_a_choice
from imageworks.chat_proxy.protocol import (
    BadGateway,
    ProxyError,
    StreamTruncated,
    json_bytes,
    parse_json,
)
from imageworks.chat_proxy.requests import parse_request, replace
from imageworks.chat_proxy.sse import Reply, shielded
from imageworks.registry.schema import RegistryEntry

# The events that end a Responses API stream, and whether the answer was made.
_RESPONSE_ENDS = {"response.completed": True, "response.incomplete": True, "response.failed": False}
_EVENT_LINE = re.compile(rb"^event:[ \t]*([^\r\n]*)", re.MULTILINE)
_SEQUENCE = re.compile(rb'"sequence_number"\s*:\s*(\d+)')


class _Passthrough:
    """What the three share: the backend's bytes forwarded, the whole answer named."""

    endpoint: Endpoint

    def __init__(self, forwarder: Forwarder, log_prompts: bool) -> None:
        self._forwarder = forwarder
        self._log_prompts = log_prompts

    async def _whole(self, exchange: Exchange, body: EndpointRequest, target: Target) -> Completion:
        content = wire_json(body, model=target.model)
        return await self._forwarder.complete_at(
            target, self.endpoint.upstream_path, content, wait=exchange.timing.upstream
        )

    async def _stream(
        self, exchange: Exchange, body: EndpointRequest, target: Target
    ) -> UpstreamStream:
        content = wire_json(body, model=target.model)
        return await self._forwarder.open_stream_at(
            target, self.endpoint.upstream_path, content, wait=exchange.timing.upstream
        )

    async def fail(self, exchange: Exchange, reply: Reply, error: ProxyError) -> None:
        await reply.fail(error)


class CompletionsFlow(_Passthrough):
    """`POST /v1/completions`: a prompt completed, whole or streamed."""

    endpoint = Endpoint.COMPLETIONS

    def __init__(self, forwarder: Forwarder, log_prompts: bool, rename: bool) -> None:
        super().__init__(forwarder, log_prompts)
        self._rename = rename

    def parse(self, raw: bytes) -> CompletionRequest:
        return parse_request(raw, CompletionRequest)

    def prompt_of(self, body: CompletionRequest) -> Any:
        return body.prompt

    async def prepare(
        self, body: CompletionRequest, entry: RegistryEntry, registry_dir: Path
    ) -> CompletionRequest:
        """The entry's sampling defaults where the request leaves them unset (a base model
        with no `max_tokens` would otherwise write until its context is full)."""
        sent = body.model_fields_set | set(body.model_extra or {})
        defaults = entry.generation_defaults
        additions = {
            field: value
            for source, field in SAMPLING_FIELDS.items()  # as a chat completion takes them
            if (value := getattr(defaults, source)) not in (None, []) and field not in sent
        }
        return replace(body, **additions) if additions else body

    async def forward(
        self,
        exchange: Exchange,
        entry: RegistryEntry,
        body: CompletionRequest,
        target: Target,
        reply: Reply,
    ) -> None:
        requested = body.model if self._rename and body.model != target.model else None
        if not exchange.stream:
            completion = await self._whole(exchange, body, target)
            exchange.usage = usage_of(completion.parsed)
            if self._log_prompts:
                exchange.response = completion.parsed.get("choices")
            exchange.end(completion.status, "ok")
            await reply.whole(completion.status, _named(completion, requested))
            return
        upstream = await self._stream(exchange, body, target)
        renamer = None if requested is None else ModelRenamer(target.model, requested)
        try:
            await reply.open_stream()  # the backend has answered: no more `: loading`
            await self._relay(exchange, upstream, reply, renamer)
        finally:
            await shielded(upstream.aclose())

    async def _relay(
        self,
        exchange: Exchange,
        upstream: UpstreamStream,
        reply: Reply,
        renamer: ModelRenamer | None,
    ) -> None:
        finished = False
        async for received in upstream.events():
            if received.strip() in DONE_EVENTS:
                break
            if (said := backend_error(received)) is not None:  # the backend gave up: say so
                exchange.end(BadGateway.status, "error", str(said.get("message") or said))
                await reply.event(received)
                await reply.done()
                return
            event = received if renamer is None else renamer.event(received)
            finished = finished or finishes_a_choice(event)
            if exchange.first_token is None or b'"usage"' in event or self._log_prompts:
                observe_chunk(exchange, event, "text", self._log_prompts)
            await reply.event(event)
        if not finished:
            raise StreamTruncated(
                f"Backend {upstream.target.label} ended the stream before the completion was "
                "finished (no choice had a finish_reason); the text is incomplete."
            )
        exchange.end(200, "ok")  # before [DONE]: a client may hang up once it reads it
        await reply.done()


class EmbeddingsFlow(_Passthrough):
    """`POST /v1/embeddings`: vectors for one text or several, never streamed."""

    endpoint = Endpoint.EMBEDDINGS

    def __init__(self, forwarder: Forwarder, log_prompts: bool, rename: bool) -> None:
        super().__init__(forwarder, log_prompts)
        self._rename = rename

    def parse(self, raw: bytes) -> EmbeddingRequest:
        return parse_request(raw, EmbeddingRequest)

    def prompt_of(self, body: EmbeddingRequest) -> Any:
        return body.input

    async def prepare(
        self, body: EmbeddingRequest, entry: RegistryEntry, registry_dir: Path
    ) -> EmbeddingRequest:
        return body  # no chat template, no sampling: what the client sent

    async def forward(
        self,
        exchange: Exchange,
        entry: RegistryEntry,
        body: EmbeddingRequest,
        target: Target,
        reply: Reply,
    ) -> None:
        completion = await self._whole(exchange, body, target)
        exchange.usage = usage_of(completion.parsed)  # the vectors are never logged
        requested = body.model if self._rename and body.model != target.model else None
        exchange.end(completion.status, "ok")
        await reply.whole(completion.status, _named(completion, requested))


class ResponsesFlow(_Passthrough):
    """`POST /v1/responses` (the Responses API, stateless), relayed byte for byte."""

    endpoint = Endpoint.RESPONSES

    def __init__(self, forwarder: Forwarder, log_prompts: bool, templates: TemplateGate) -> None:
        super().__init__(forwarder, log_prompts)
        self._templates = templates

    def parse(self, raw: bytes) -> ResponsesRequest:
        return parse_request(raw, ResponsesRequest)

    def prompt_of(self, body: ResponsesRequest) -> Any:
        return body.input

    async def prepare(
        self, body: ResponsesRequest, entry: RegistryEntry, registry_dir: Path
    ) -> ResponsesRequest:
        await self._templates.check(entry, registry_dir)  # servers answer through it
        return body

    async def forward(
        self,
        exchange: Exchange,
        entry: RegistryEntry,
        body: ResponsesRequest,
        target: Target,
        reply: Reply,
    ) -> None:
        if not exchange.stream:
            completion = await self._whole(exchange, body, target)
            exchange.usage = _response_usage(completion.parsed)
            if self._log_prompts:
                exchange.response = completion.parsed.get("output")
            exchange.end(completion.status, "ok")
            await reply.whole(completion.status, completion.content)
            return
        upstream = await self._stream(exchange, body, target)
        try:
            await reply.open_stream()
            await self._relay(exchange, upstream, reply)
        finally:
            await shielded(upstream.aclose())

    async def _relay(self, exchange: Exchange, upstream: UpstreamStream, reply: Reply) -> None:
        async for event in upstream.events():
            kind = _event_type(event)
            # Its number, or (llama-server numbers none) the next after the last one's.
            found = _SEQUENCE.search(event)
            last = exchange.sequence
            exchange.sequence = int(found.group(1)) if found else 0 if last is None else last + 1
            said = backend_error(event)
            if said is not None or kind == "error":  # the backend gave up, in either shape
                detail = said or _payload(event) or {}
                exchange.end(BadGateway.status, "error", str(detail.get("message") or detail))
                await reply.event(event)
                await reply.end()
                return
            if kind == "response.output_text.delta":
                self._observe_delta(exchange, event)
            made = _RESPONSE_ENDS.get(kind) if kind is not None else None
            if made is not None:
                response = (_payload(event) or {}).get("response")
                if isinstance(response, dict):
                    exchange.usage = _response_usage(response)
                if made:
                    exchange.end(200, "ok")
                else:
                    exchange.end(BadGateway.status, "error", f"the backend sent {kind}")
                await reply.event(event)
                await reply.end()
                return
            await reply.event(event)
        raise StreamTruncated(
            f"Backend {upstream.target.label} ended the stream before the response was "
            "finished (no response.completed event); the answer is incomplete."
        )

    def _observe_delta(self, exchange: Exchange, event: bytes) -> None:
        if exchange.first_token is None:
            exchange.first_token = time.perf_counter()
        if self._log_prompts:
            delta = (_payload(event) or {}).get("delta")
            if isinstance(delta, str):
                exchange.response_text.append(delta)

    async def fail(self, exchange: Exchange, reply: Reply, error: ProxyError) -> None:
        """Once the stream has begun, the Responses API's own error event ends it."""
        await reply.quiet()
        if not reply.started or reply.complete:
            await reply.fail(error)
            return
        sequence = 0 if exchange.sequence is None else exchange.sequence + 1
        await reply.event(responses_error_event(error, sequence))
        await reply.end()


def responses_error_event(error: ProxyError, sequence: int) -> bytes:
    data = {
        "type": "error",
        "code": error.code,
        "message": error.message,
        "param": error.param,
        "sequence_number": sequence,
    }
    return b"event: error\ndata: " + json_bytes(data) + b"\n\n"


def _payload(event: bytes) -> dict[str, Any] | None:
    """The JSON object in an event's `data:` lines (after its `event:` line), or None."""
    lines = [line for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    try:
        data = parse_json(b"\n".join(line[5:] for line in lines))
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _event_type(event: bytes) -> str | None:
    """A Responses stream event's type: its `event:` line, else its data's `type`."""
    line = _EVENT_LINE.search(event)
    if line is not None:
        return line.group(1).strip().decode("utf-8", "replace")
    data = _payload(event)
    kind = data.get("type") if data is not None else None
    return kind if isinstance(kind, str) else None


def _response_usage(response: dict[str, Any]) -> dict[str, Any] | None:
    """A Responses API usage (`input_tokens`, `output_tokens`) in the log's terms."""
    usage = response.get("usage")
    if not isinstance(usage, dict):
        return None
    return {
        "prompt_tokens": usage.get("input_tokens"),
        "completion_tokens": usage.get("output_tokens"),
        "total_tokens": usage.get("total_tokens"),
    }


def _named(completion: Completion, model: str | None) -> bytes:
    """The answer's bytes, with `model` set to the name the client asked for (None: as is)."""
    if model is None or completion.parsed.get("model") in (None, model):
        return completion.content
    return json_bytes({**completion.parsed, "model": model})
