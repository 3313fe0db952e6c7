"""Counting a stream's usage with the backend's own tokenizer endpoints (a fake `post` here)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from imageworks.backends.base import Dialect
from imageworks.chat_proxy.protocol import BadGateway
from imageworks.chat_proxy.usage import (
    Generated,
    LlamaServerTokenizer,
    StreamUsage,
    VllmTokenizer,
    count_usage,
    stream_texts,
    tokenizer_for,
)

pytestmark = pytest.mark.timeout(10)

MESSAGES = [{"role": "user", "content": "ping"}]


class FakeBackend:
    """Answers each path with the next of its scripted answers, and records what was posted."""

    def __init__(self, **answers: list[Any]) -> None:
        self._answers = {f"/{path.replace('_', '-')}": list(a) for path, a in answers.items()}
        self.posted: list[tuple[str, dict[str, Any]]] = []

    async def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        self.posted.append((path, payload))
        answer = self._answers[path].pop(0)
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, dict)
        return answer


def event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def chunk(*choices: dict[str, Any]) -> dict[str, Any]:
    envelope = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m"}
    return {**envelope, "choices": list(choices)}


def delta(index: int = 0, **fields: Any) -> dict[str, Any]:
    return {"index": index, "delta": fields, "finish_reason": None}


@pytest.mark.parametrize(
    ("dialect", "kind"),
    [
        (Dialect.LLAMA_SERVER, LlamaServerTokenizer),
        (Dialect.VLLM, VllmTokenizer),
        (Dialect.LLAMA_CPP_PYTHON, None),  # no template endpoint: its prompt cannot be counted
        (Dialect.OLLAMA, None),
        (Dialect.OPENAI, None),
    ],
)
def test_tokenizer_for_the_servers_that_have_endpoints(dialect: Dialect, kind: Any) -> None:
    tokenizer = tokenizer_for(dialect, "m", FakeBackend().post)
    assert (tokenizer is None) if kind is None else isinstance(tokenizer, kind)


async def test_llama_server_counts_the_templated_prompt_and_the_text() -> None:
    backend = FakeBackend(
        apply_template=[{"prompt": "<|user|>ping<|assistant|>"}],
        tokenize=[{"tokens": [1, 2, 3, 4]}, {"tokens": [5, 6]}],
    )
    tools = [{"type": "function", "function": {"name": "f"}}]
    tokenizer = LlamaServerTokenizer(backend.post)
    body = {"model": "m", "messages": MESSAGES, "tools": tools, "temperature": 0.5}
    assert await tokenizer.prompt_tokens(body) == 4
    assert await tokenizer.text_tokens("Hello there") == 2
    assert backend.posted == [
        ("/apply-template", {"messages": MESSAGES, "tools": tools}),
        (
            "/tokenize",
            {"content": "<|user|>ping<|assistant|>", "add_special": True, "parse_special": True},
        ),
        ("/tokenize", {"content": "Hello there", "add_special": False, "parse_special": True}),
    ]


async def test_vllm_counts_the_chat_and_the_text() -> None:
    backend = FakeBackend(tokenize=[{"count": 9, "tokens": [], "max_model_len": 8}, {"count": 2}])
    tokenizer = VllmTokenizer(backend.post, "qwen")
    assert await tokenizer.prompt_tokens({"model": "x", "messages": MESSAGES}) == 9
    assert await tokenizer.text_tokens("Hello there") == 2
    assert backend.posted == [
        ("/tokenize", {"model": "qwen", "messages": MESSAGES, "add_generation_prompt": True}),
        ("/tokenize", {"model": "qwen", "prompt": "Hello there", "add_special_tokens": False}),
    ]


async def test_count_usage_sums_the_choices() -> None:
    backend = FakeBackend(tokenize=[{"count": 9}, {"count": 2}, {"count": 3}])
    generated = [Generated("a b", "length"), Generated("c d e", None)]
    usage = await count_usage(
        VllmTokenizer(backend.post, "q"), {"messages": MESSAGES}, generated, "x"
    )
    assert usage == {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}


@pytest.mark.parametrize(
    ("finish_reason", "stop", "completion"),
    [
        ("stop", None, 3),  # the end-of-turn token the model stopped on
        ("tool_calls", None, 3),
        ("length", None, 2),  # cut off: no end token
        ("stop", ["\n\n"], 2),  # maybe a stop sequence, which the backend removed: not known
        (None, None, 2),
    ],
)
async def test_count_usage_counts_the_end_of_turn_token(
    finish_reason: str | None, stop: Any, completion: int
) -> None:
    backend = FakeBackend(tokenize=[{"count": 9}, {"count": 2}])
    body = {"messages": MESSAGES, "stop": stop}
    generated = [Generated("a b", finish_reason)]
    usage = await count_usage(VllmTokenizer(backend.post, "q"), body, generated, "x")
    assert usage is not None
    assert usage["completion_tokens"] == completion


async def test_count_usage_of_an_empty_answer_counts_only_its_end() -> None:
    backend = FakeBackend(tokenize=[{"count": 9}])
    generated = [Generated("", "stop")]
    usage = await count_usage(
        VllmTokenizer(backend.post, "q"), {"messages": MESSAGES}, generated, "x"
    )
    assert usage == {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10}
    assert len(backend.posted) == 1  # nothing to tokenize


@pytest.mark.parametrize(
    "failure",
    [BadGateway("backend failed", code="upstream_error"), {"count": "many"}, {"tokens": 3}],
    ids=["error", "not-a-count", "wrong-shape"],
)
async def test_count_usage_that_fails_is_no_usage(failure: Any) -> None:
    backend = FakeBackend(tokenize=[failure])
    tokenizer = VllmTokenizer(backend.post, "q")
    generated = [Generated("text", "stop")]
    assert await count_usage(tokenizer, {"messages": MESSAGES}, generated, "x") is None


async def test_llama_server_without_a_prompt_is_no_usage() -> None:
    backend = FakeBackend(apply_template=[{"error": "no template"}])
    tokenizer = LlamaServerTokenizer(backend.post)
    generated = [Generated("text", "stop")]
    assert await count_usage(tokenizer, {"messages": MESSAGES}, generated, "x") is None


def test_stream_texts_collect_what_each_choice_generated() -> None:
    call = {"index": 0, "id": "call_1", "function": {"name": "get_weather", "arguments": ""}}
    events = [
        b": loading\n\n",
        event(chunk(delta(role="assistant", content=""))),
        event(chunk(delta(reasoning_content="hmm "), delta(1, content="B"))),
        event(chunk(delta(content="A"), delta(1, tool_calls=[call]))),
        event(chunk(delta(1, tool_calls=[{"index": 0, "function": {"arguments": '{"c": 1}'}}]))),
        event(chunk({"index": 2, "delta": {}, "finish_reason": "stop"})),
        event({"error": {"message": "not a chunk"}}),
        b"data: [DONE]\n\n",
    ]
    envelope, texts = stream_texts(events)
    assert envelope == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "m",
    }
    assert texts == [
        Generated("hmm A", None),
        Generated('Bget_weather{"c": 1}', None),
        Generated("", "stop"),
    ]


async def test_stream_usage_chunk_has_the_stream_envelope_and_no_choices() -> None:
    backend = FakeBackend(
        apply_template=[{"prompt": "p q"}], tokenize=[{"tokens": [1, 2]}, {"tokens": [3]}]
    )
    usage = StreamUsage(LlamaServerTokenizer(backend.post), {"messages": MESSAGES}, "llamacpp:m")
    usage.keep(event(chunk(delta(content="Hi"))))
    assert await usage.chunk() == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "m",
        "choices": [],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
    }
