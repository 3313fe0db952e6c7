"""What is particular to a chat completion, in the one owner's pipeline (`chat.py`): its parse,
its normalizations (capabilities, images, tools, entry defaults, the dialect's structured
output), Ollama's native path, model renaming, usage counted when the backend sends none, and
the relay that ends a stream with `[DONE]` or with the error that says why it did not finish.
"""

from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path
from typing import Any

from imageworks.backends.base import Dialect, Target
from imageworks.backends.endpoints import Endpoint
from imageworks.backends.templates import TemplateCheck, check_chat_template
from imageworks.chat_proxy.exchange import Exchange, usage_of
from imageworks.chat_proxy.forwarding import Completion, Forwarder, UpstreamStream
from imageworks.chat_proxy.normalize.ollama_path import needs_native_ollama, ollama_num_ctx
from imageworks.chat_proxy.normalize.reasoning import split_think_completion
from imageworks.chat_proxy.normalize.request import RequestRules, prepare_request
from imageworks.chat_proxy.normalize.response import ModelRenamer, complete_answer
from imageworks.chat_proxy.normalize.stream import EventNormalizer, backend_error
from imageworks.chat_proxy.normalize.structured import structured_for
from imageworks.chat_proxy.normalize.tools import normalize_completion
from imageworks.chat_proxy.normalize.vision import has_images
from imageworks.chat_proxy.protocol import (
    BadGateway,
    InvalidRequest,
    ProxyError,
    StreamTruncated,
    json_bytes,
    parse_json,
    sse_event,
)
from imageworks.chat_proxy.requests import (
    RESPONSE_FORMAT,
    ChatCompletionRequest,
    as_json_data,
    parse_chat_request,
    replace,
)
from imageworks.chat_proxy.sse import Reply, shielded
from imageworks.chat_proxy.usage import StreamUsage, tokenizer_for
from imageworks.registry.entry_cache import PerEntry
from imageworks.registry.naming import display_name
from imageworks.registry.schema import RegistryEntry

DONE_EVENTS = (b"data: [DONE]", b"data:[DONE]")

# Backends whose servers render the chat template themselves from the weights (Ollama embeds
# it in its model files; external servers are someone else's business).
TEMPLATED_BACKENDS = frozenset({"vllm", "llamacpp"})


class TemplateGate:
    """Refuses a request that needs a chat template from an entry that has none (chat, and
    the Responses API, which servers answer through the chat template)."""

    def __init__(self, require: bool) -> None:
        self._require = require
        self._checks: PerEntry[TemplateCheck] = PerEntry()

    async def check(self, entry: RegistryEntry, registry_dir: Path) -> None:
        if not self._require or entry.backend not in TEMPLATED_BACKENDS:
            return
        check = await self._check(entry, registry_dir)
        if not check.ok:
            raise InvalidRequest(
                f"Model '{display_name(entry)}' has no chat template: {check.reason}. Set "
                f"chat_template.path in registry entry {entry.name!r} (or run the proxy "
                "with CHAT_PROXY_REQUIRE_TEMPLATE=0).",
                param="model",
                code="chat_template_missing",
            )

    async def _check(self, entry: RegistryEntry, registry_dir: Path) -> TemplateCheck:
        check = self._checks.get(entry)
        if check is None:
            check = await asyncio.to_thread(check_chat_template, entry, registry_dir)
            self._checks.put(entry, check)
        return check


class ChatFlow:
    """`POST /v1/chat/completions`."""

    endpoint = Endpoint.CHAT

    def __init__(
        self,
        forwarder: Forwarder,
        templates: TemplateGate,
        request_rules: RequestRules,
        *,
        normalize_tools: bool,
        split_think_tags: bool,
        log_prompts: bool,
        requested_model_in_answers: bool,
    ) -> None:
        self._forwarder = forwarder
        self._templates = templates
        self._request_rules = request_rules
        self._normalize_tools = normalize_tools
        self._split_think = split_think_tags
        self._log_prompts = log_prompts
        self._requested_model = requested_model_in_answers

    def parse(self, raw: bytes) -> ChatCompletionRequest:
        return parse_chat_request(raw)

    def prompt_of(self, body: ChatCompletionRequest) -> Any:
        return [as_json_data(message) for message in body.messages]

    async def prepare(
        self, body: ChatCompletionRequest, entry: RegistryEntry, registry_dir: Path
    ) -> ChatCompletionRequest:
        """Check and shape the request for the entry (400s come from here)."""
        await self._templates.check(entry, registry_dir)
        shown = display_name(entry)
        if has_images(body.messages):  # decoding images is CPU work: not on the loop
            return await asyncio.to_thread(prepare_request, body, entry, shown, self._request_rules)
        return prepare_request(body, entry, shown, self._request_rules)

    async def fail(self, exchange: Exchange, reply: Reply, error: ProxyError) -> None:
        await reply.fail(error)

    async def forward(
        self,
        exchange: Exchange,
        entry: RegistryEntry,
        body: ChatCompletionRequest,
        target: Target,
        reply: Reply,
    ) -> None:
        body = _in_dialect(body, target.dialect)  # the server's form of response_format
        native_ollama = entry.backend == "ollama" and needs_native_ollama(body, entry)
        num_ctx = ollama_num_ctx(entry)
        requested = body.model if self._requested_model else None
        upstream_wait = exchange.timing.upstream
        if not exchange.stream:
            if native_ollama:
                completion = await self._forwarder.complete_ollama(
                    target, body, num_ctx, wait=upstream_wait
                )
            else:
                completion = await self._forwarder.complete(target, body, wait=upstream_wait)
            await self._send_completion(exchange, completion, reply, requested)
            return
        if native_ollama:
            upstream = await self._forwarder.open_ollama_stream(
                target, body, num_ctx, wait=upstream_wait
            )
        else:
            upstream = await self._forwarder.open_stream(target, body, wait=upstream_wait)
        renamer = None
        if requested is not None and requested != target.model:
            renamer = ModelRenamer(target.model, requested)
        try:
            await reply.open_stream()  # the backend has answered: no more `: loading`
            await self._relay(exchange, upstream, reply, renamer, self._usage(body, target))
        finally:
            await shielded(upstream.aclose())

    def _usage(self, body: ChatCompletionRequest, target: Target) -> StreamUsage | None:
        """How a stream's usage chunk is counted if the backend sends none: for a client that
        asked for one, from a backend that has a tokenizer endpoint."""
        options = body.stream_options
        if options is None or options.include_usage is not True:
            return None
        post = functools.partial(self._forwarder.backend_json, target)
        tokenizer = tokenizer_for(target.dialect, target.model, post)
        if tokenizer is None:
            return None
        return StreamUsage(tokenizer, as_json_data(body), target.label)

    async def _send_completion(
        self, exchange: Exchange, completion: Completion, reply: Reply, model: str | None
    ) -> None:
        content, parsed = self._normalize_completion(completion.content, completion.parsed, model)
        exchange.usage = usage_of(parsed)
        if self._log_prompts:
            exchange.response = parsed.get("choices")
        exchange.end(completion.status, "ok")
        await reply.whole(completion.status, content)

    async def _relay(
        self,
        exchange: Exchange,
        upstream: UpstreamStream,
        reply: Reply,
        renamer: ModelRenamer | None,
        usage: StreamUsage | None,
    ) -> None:
        """The backend's events, one by one as they come; then the usage chunk if the client
        asked for one and the backend sent none (counted), and `[DONE]` if the answer finished,
        else the error that says why it did not."""
        normalizer = EventNormalizer(tools=self._normalize_tools, split_think=self._split_think)
        async for received in upstream.events():
            if received.strip() in DONE_EVENTS:
                break  # the end: nothing the backend sends after it matters
            if (said := backend_error(received)) is not None:  # the backend gave up: say so
                exchange.end(BadGateway.status, "error", str(said.get("message") or said))
                await reply.event(received)
                await reply.done()
                return
            event = normalizer.process(received)
            if renamer is not None:
                event = renamer.event(event)
            if exchange.first_token is None or b'"usage"' in event or self._log_prompts:
                observe_chunk(exchange, event, "delta", self._log_prompts)
            if usage is not None and exchange.usage is None:
                usage.keep(event)
            await reply.event(event)
        if (last := normalizer.flush()) is not None:
            last = last if renamer is None else renamer.event(last)
            if usage is not None and exchange.usage is None:
                usage.keep(last)
            await reply.event(last)
        if not normalizer.finished:
            raise StreamTruncated(
                f"Backend {upstream.target.label} ended the stream before the answer was "
                "finished (no choice had a finish_reason); the answer is incomplete."
            )
        if usage is not None and exchange.usage is None:  # the backend did not report it
            counted = await usage.chunk()
            if counted is not None:
                exchange.usage = counted["usage"]
                await reply.event(sse_event(counted))
        # Settled before [DONE] goes out: a client that hangs up as soon as it reads it (the
        # OpenAI SDK does) has not cancelled anything.
        exchange.end(200, "ok")
        await reply.done()

    def _normalize_completion(
        self, content: bytes, parsed: dict[str, Any], model: str | None
    ) -> tuple[bytes, dict[str, Any]]:
        """Tool calls, think tags and OpenAI's fields in a whole answer (`model`: the name it
        gives the model, None to keep the backend's); the backend's bytes if nothing changes."""
        result = parsed
        if self._normalize_tools:
            result = normalize_completion(result)
        if self._split_think:
            result = split_think_completion(result)
        result = complete_answer(result, model)
        if result is parsed:
            return content, parsed
        return json_bytes(result), result


def observe_chunk(exchange: Exchange, event: bytes, piece: str, log_prompts: bool) -> None:
    """Read a `data:` chunk for bookkeeping only (usage, the first token, the text when
    prompts are logged); what the client gets is the original bytes. `piece` is where a
    choice's text is: `delta` (chat: `delta.content`) or `text` (completions)."""
    data = event.strip()
    if not data.startswith(b"data:"):
        return
    try:
        chunk = parse_json(data[5:])
    except (ValueError, UnicodeDecodeError):
        return
    if not isinstance(chunk, dict):
        return
    if chunk.get("usage"):
        exchange.usage = usage_of(chunk)
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if piece == "text":
            content, calls = choice.get("text"), None
        else:
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            content, calls = delta.get("content"), delta.get("tool_calls")
        if (content or calls) and exchange.first_token is None:
            exchange.first_token = time.perf_counter()
        if log_prompts and isinstance(content, str):
            exchange.response_text.append(content)


def _in_dialect(request: ChatCompletionRequest, dialect: Dialect) -> ChatCompletionRequest:
    """`response_format` in the form the server takes (`structured_for` works on JSON data)."""
    if request.response_format is None:
        return request
    current = {"response_format": as_json_data(request.response_format)}
    shaped = structured_for(current, dialect)
    if shaped is current:
        return request
    response_format = RESPONSE_FORMAT.validate_python(shaped["response_format"])
    return replace(request, response_format=response_format)
