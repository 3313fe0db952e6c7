"""The usage chunk of a stream whose client asked for one (`stream_options.include_usage`).

It ends the stream before `[DONE]`, as OpenAI's does: `choices: []` and `usage: {prompt_tokens,
completion_tokens, total_tokens}`. Where the numbers come from:

- the backend's own usage chunk, forwarded as it is (llama-server, vLLM and Ollama send one);
- else the backend's tokenizer endpoints, where it has them (`tokenizer_for`):
      llama-server  POST /apply-template {"messages", ...} -> {"prompt"} (its chat template),
                    POST /tokenize {"content", "add_special", "parse_special"} -> {"tokens"}
      vLLM          POST /tokenize {"model", "messages", "add_generation_prompt"} -> {"count"},
                    POST /tokenize {"model", "prompt", "add_special_tokens": false} -> {"count"}
  the prompt as the backend renders it; the completion as the text the stream carried (each
  choice's reasoning, content and tool-call names and arguments) tokenized again, plus the
  end-of-turn token a choice stopped on (finish_reason `stop` or `tool_calls` in a request
  without `stop` sequences), which the text does not carry but the servers count. Not in the
  text, hence not counted: a matched stop sequence, and the markup around tool calls;
- else nothing: llama-cpp-python, external servers, and any count that fails get no usage chunk.
  Numbers are never guessed.

Off the hot path: a stream only keeps references to the events it sent (`StreamUsage.keep`); they
are parsed once, at the end, and only when the backend sent no usage itself.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from imageworks.backends.base import Dialect
from imageworks.chat_proxy.normalize.stream import event_data
from imageworks.chat_proxy.protocol import ProxyError

log = logging.getLogger("imageworks.chat_proxy.usage")

JsonDict = dict[str, Any]
# POST a JSON body to a path at the backend's root (beside /v1), for its JSON object answer.
Post = Callable[[str, JsonDict], Awaitable[JsonDict]]

# Request fields that change the prompt a chat template renders.
_TEMPLATE_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs")
_VLLM_TEMPLATE_FIELDS: tuple[str, ...] = ("tools", "chat_template_kwargs")
_ENVELOPE = ("id", "object", "created", "model", "system_fingerprint")


class UncountableUsage(Exception):
    """A tokenizer endpoint answered something that is not a count."""


class Tokenizer(Protocol):
    async def prompt_tokens(self, body: JsonDict) -> int:
        """Tokens of the request's prompt, chat template applied."""
        ...

    async def text_tokens(self, text: str) -> int:
        """Tokens of generated text."""
        ...


def tokenizer_for(dialect: Dialect, model: str, post: Post) -> Tokenizer | None:
    """The backend's own tokenizer, for the servers that have endpoints for it."""
    if dialect is Dialect.LLAMA_SERVER:
        return LlamaServerTokenizer(post)
    if dialect is Dialect.VLLM:
        return VllmTokenizer(post, model)
    return None


class LlamaServerTokenizer:
    def __init__(self, post: Post) -> None:
        self._post = post

    async def prompt_tokens(self, body: JsonDict) -> int:
        fields = {key: body[key] for key in _TEMPLATE_FIELDS if key in body}
        rendered = await self._post("/apply-template", {"messages": body["messages"], **fields})
        prompt = rendered.get("prompt")
        if not isinstance(prompt, str):
            raise UncountableUsage("/apply-template answered without a prompt")
        # As llama-server tokenizes a chat prompt itself: special tokens added and parsed.
        return await self._tokens({"content": prompt, "add_special": True, "parse_special": True})

    async def text_tokens(self, text: str) -> int:
        return await self._tokens({"content": text, "add_special": False, "parse_special": True})

    async def _tokens(self, payload: JsonDict) -> int:
        tokens = (await self._post("/tokenize", payload)).get("tokens")
        if not isinstance(tokens, list):
            raise UncountableUsage("/tokenize answered without tokens")
        return len(tokens)


class VllmTokenizer:
    def __init__(self, post: Post, model: str) -> None:
        self._post = post
        self._model = model

    async def prompt_tokens(self, body: JsonDict) -> int:
        fields = {key: body[key] for key in _VLLM_TEMPLATE_FIELDS if key in body}
        payload: JsonDict = {"model": self._model, "messages": body["messages"], **fields}
        return await self._count({**payload, "add_generation_prompt": True})

    async def text_tokens(self, text: str) -> int:
        payload: JsonDict = {"model": self._model, "prompt": text, "add_special_tokens": False}
        return await self._count(payload)

    async def _count(self, payload: JsonDict) -> int:
        count = (await self._post("/tokenize", payload)).get("count")
        if not isinstance(count, int) or isinstance(count, bool):
            raise UncountableUsage("/tokenize answered without a count")
        return count


class StreamUsage:
    """One stream's usage chunk: `keep` each event sent, then `chunk()` once it has ended."""

    def __init__(self, tokenizer: Tokenizer, body: JsonDict, label: str) -> None:
        self._tokenizer = tokenizer
        self._body = body
        self._label = label
        self._events: list[bytes] = []

    def keep(self, event: bytes) -> None:
        self._events.append(event)

    async def chunk(self) -> JsonDict | None:
        """The usage chunk, counted by the backend; None when it cannot count."""
        envelope, generated = stream_texts(self._events)
        usage = await count_usage(self._tokenizer, self._body, generated, self._label)
        if usage is None:
            return None
        return {**envelope, "object": "chat.completion.chunk", "choices": [], "usage": usage}


@dataclass(frozen=True, slots=True)
class Generated:
    """What one choice of a stream generated."""

    text: str
    finish_reason: str | None


async def count_usage(
    tokenizer: Tokenizer, body: JsonDict, generated: Sequence[Generated], label: str
) -> dict[str, int] | None:
    """Usage counted by `tokenizer`: the prompt, and each choice's text with the end-of-turn
    token it stopped on; None if the backend cannot count."""
    ends_on_its_token = ("stop", "tool_calls") if not body.get("stop") else ()
    try:
        prompt = await tokenizer.prompt_tokens(body)
        completion = 0
        for choice in generated:
            completion += await tokenizer.text_tokens(choice.text) if choice.text else 0
            completion += 1 if choice.finish_reason in ends_on_its_token else 0
    except (ProxyError, UncountableUsage) as exc:
        log.warning("backend %s could not count the stream's usage: %s", label, exc)
        return None
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def stream_texts(events: Sequence[bytes]) -> tuple[JsonDict, list[Generated]]:
    """The envelope (`id`, `created`, `model`, ...) of a stream's chunks, and what each choice
    generated, in choice order."""
    envelope: JsonDict = {}
    pieces: dict[int, list[str]] = {}
    finishes: dict[int, str] = {}
    for event in events:
        chunk = event_data(event)
        if chunk is None:
            continue
        if not envelope:
            envelope = {key: chunk[key] for key in _ENVELOPE if key in chunk}
        choices = chunk.get("choices")
        for position, choice in enumerate(choices if isinstance(choices, list) else ()):
            if not isinstance(choice, dict) or not isinstance(choice.get("delta"), dict):
                continue
            index = choice.get("index")
            index = index if isinstance(index, int) else position
            pieces.setdefault(index, []).extend(_generated(choice["delta"]))
            if isinstance(choice.get("finish_reason"), str):
                finishes[index] = choice["finish_reason"]
    return envelope, [
        Generated("".join(pieces[index]), finishes.get(index)) for index in sorted(pieces)
    ]


def _generated(delta: JsonDict) -> list[str]:
    texts = [delta.get("reasoning_content"), delta.get("content")]
    calls = delta.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            texts += [function.get("name"), function.get("arguments")]
    return [text for text in texts if isinstance(text, str)]
