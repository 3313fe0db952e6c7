"""How an error reaches a client of each endpoint once its stream has begun: chat and
completions clients read `data: {"error"}` and `[DONE]`; Responses API clients its own
`event: error`, numbered after the last event they got."""

from __future__ import annotations

import json
from typing import Any

import pytest

from imageworks.chat_proxy.exchange import Exchange
from imageworks.chat_proxy.passthrough import CompletionsFlow, ResponsesFlow
from imageworks.chat_proxy.protocol import BackendTimeout, StreamTruncated
from imageworks.chat_proxy.sse import Reply

pytestmark = pytest.mark.timeout(10)


class Sent:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, message: Any) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def body(self) -> str:
        return b"".join(m.get("body", b"") for m in self.messages[1:]).decode()

    @property
    def ended(self) -> bool:
        return self.messages[-1]["type"] == "http.response.body" and not self.messages[-1].get(
            "more_body", False
        )


def _responses() -> ResponsesFlow:
    return ResponsesFlow(None, log_prompts=False, templates=None)  # type: ignore[arg-type]


async def test_a_responses_stream_that_fails_ends_with_the_apis_error_event() -> None:
    sent = Sent()
    reply = Reply(sent)
    await reply.event(b"event: response.created\ndata: {}\n\n")
    exchange = Exchange(endpoint="/v1/responses")
    exchange.sequence = 4
    await _responses().fail(exchange, reply, StreamTruncated("the answer is incomplete"))
    last = sent.body.split("\n\n")[-2]
    head, data = last.split("\n")
    assert head == "event: error"
    assert json.loads(data.removeprefix("data: ")) == {
        "type": "error",
        "code": "stream_truncated",
        "message": "the answer is incomplete",
        "param": None,
        "sequence_number": 5,
    }
    assert "[DONE]" not in sent.body
    assert sent.ended


async def test_a_responses_stream_that_fails_before_any_event_numbers_its_error_zero() -> None:
    sent = Sent()
    reply = Reply(sent)
    await reply.event(b": loading m 5s\n\n")  # only a heartbeat so far
    await _responses().fail(Exchange(), reply, BackendTimeout("silent", code="backend_timeout"))
    error = json.loads(sent.body.split("\n\n")[-2].split("\n")[1].removeprefix("data: "))
    assert (error["code"], error["sequence_number"]) == ("backend_timeout", 0)


async def test_a_responses_failure_before_the_stream_is_a_status_with_the_envelope() -> None:
    sent = Sent()
    await _responses().fail(Exchange(), Reply(sent), BackendTimeout("silent", code="x"))
    assert sent.status == 504
    assert json.loads(sent.body)["error"]["code"] == "x"


async def test_a_completion_stream_that_fails_ends_as_chats_does() -> None:
    sent = Sent()
    reply = Reply(sent)
    await reply.event(b'data: {"choices": []}\n\n')
    flow = CompletionsFlow(None, log_prompts=False, rename=True)  # type: ignore[arg-type]
    await flow.fail(Exchange(), reply, StreamTruncated("cut"))
    events = [e for e in sent.body.split("\n\n") if e]
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "stream_truncated"
    assert events[-1] == "data: [DONE]"
