"""TaskResponse and Reply: the work writes the response, and whatever way it ends (finished,
failed, the client gone, the server cancelling) its cleanup runs to the end."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from imageworks.chat_proxy.protocol import BackendTimeout, QueueTimeout
from imageworks.chat_proxy.sse import Reply, TaskResponse, shielded

pytestmark = pytest.mark.timeout(10)

Work = Callable[[Reply], Awaitable[None]]


async def run(
    work: Work, *, leave: asyncio.Event | None = None, send_fails: bool = False
) -> list[dict[str, Any]]:
    """The messages `TaskResponse(work)` sends; the client leaves when `leave` is set."""
    sent: list[dict[str, Any]] = []
    gone = leave or asyncio.Event()

    async def receive() -> dict[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        if send_fails:
            raise OSError("connection reset")
        sent.append(message)

    await TaskResponse(work)({"type": "http"}, receive, send)
    return sent


def bodies(sent: list[dict[str, Any]]) -> list[bytes]:
    return [m["body"] for m in sent if m["type"] == "http.response.body"]


async def test_whole_body_goes_out_with_its_status_and_headers() -> None:
    async def work(reply: Reply) -> None:
        await reply.whole(201, b'{"a":1}', headers={"X-Thing": "yes"})

    sent = await run(work)
    assert sent[0]["status"] == 201
    assert (b"x-thing", b"yes") in sent[0]["headers"]
    assert (b"content-length", b"7") in sent[0]["headers"]
    assert sent[1] == {"type": "http.response.body", "body": b'{"a":1}', "more_body": False}


async def test_stream_headers_go_out_with_the_first_event() -> None:
    async def work(reply: Reply) -> None:
        assert not reply.started
        await reply.event(b"data: 1\n\n")
        assert reply.started
        await reply.done()

    sent = await run(work)
    assert sent[0]["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in sent[0]["headers"]
    assert bodies(sent) == [b"data: 1\n\n", b"data: [DONE]\n\n", b""]
    assert sent[-1]["more_body"] is False


async def test_heartbeats_until_the_first_event_then_none() -> None:
    async def work(reply: Reply) -> None:
        reply.keep_alive(0.02, lambda: "loading m")
        await asyncio.sleep(0.15)
        await reply.event(b"data: 1\n\n")
        await asyncio.sleep(0.1)  # no heartbeat once the stream is under way
        await reply.done()

    sent = await run(work)
    beats = [b for b in bodies(sent) if b.startswith(b":")]
    assert len(beats) >= 2
    assert beats[0] == b": loading m 0s\n\n"
    assert bodies(sent)[len(beats) :] == [b"data: 1\n\n", b"data: [DONE]\n\n", b""]


async def test_fail_before_the_stream_began_is_json_with_the_error_status() -> None:
    async def work(reply: Reply) -> None:
        reply.keep_alive(5, lambda: "loading m")  # never beats: the failure comes first
        await reply.fail(QueueTimeout("busy", 1.5))

    sent = await run(work)
    assert sent[0]["status"] == 503
    assert (b"retry-after", b"2") in sent[0]["headers"]
    assert b'"code":"queue_timeout"' in bodies(sent)[0]


async def test_fail_after_the_stream_began_is_an_error_event_then_done() -> None:
    async def work(reply: Reply) -> None:
        await reply.event(b"data: 1\n\n")
        await reply.fail(BackendTimeout("quiet", code="stream_idle_timeout"))

    sent = await run(work)
    assert sent[0]["status"] == 200
    events = bodies(sent)
    assert b'"code":"stream_idle_timeout"' in events[1]
    assert events[2:] == [b"data: [DONE]\n\n", b""]


async def test_client_gone_cancels_the_work_and_its_cleanup_runs() -> None:
    cleaned: list[str] = []
    leave = asyncio.Event()

    async def work(reply: Reply) -> None:
        try:
            await reply.event(b"data: 1\n\n")
            leave.set()
            await asyncio.Event().wait()  # an upstream that goes quiet
        finally:
            await asyncio.sleep(0.01)  # a cleanup that awaits still gets to the end
            cleaned.append("work")

    sent = await run(work, leave=leave)
    assert cleaned == ["work"]
    assert bodies(sent) == [b"data: 1\n\n"]


async def test_client_gone_before_anything_was_written_cancels_the_work() -> None:
    cleaned: list[str] = []
    leave = asyncio.Event()
    leave.set()

    async def work(reply: Reply) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append("work")

    assert await run(work, leave=leave) == []
    assert cleaned == ["work"]


async def test_a_failing_send_ends_the_work_quietly() -> None:
    reached: list[str] = []

    async def work(reply: Reply) -> None:
        await reply.event(b"data: 1\n\n")
        reached.append("never")

    assert await run(work, send_fails=True) == []
    assert reached == []


async def test_a_bug_in_the_work_reaches_the_server() -> None:
    async def work(reply: Reply) -> None:
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        await run(work)


async def test_shielded_cleanup_finishes_even_if_the_response_is_cancelled_again() -> None:
    cleaned: list[str] = []
    leave = asyncio.Event()
    cleaning = asyncio.Event()

    async def release() -> None:
        cleaning.set()
        await asyncio.sleep(0.1)
        cleaned.append("lease")

    async def work(reply: Reply) -> None:
        try:
            leave.set()
            await asyncio.Event().wait()
        finally:
            await shielded(release())

    response = asyncio.ensure_future(run(work, leave=leave))
    await cleaning.wait()
    response.cancel()  # the server gives up on the response while the lease is let go
    with pytest.raises(asyncio.CancelledError):
        await response
    assert cleaned == ["lease"]


async def test_stopping_the_heartbeat_keeps_the_callers_own_cancellation() -> None:
    writing, release = asyncio.Event(), asyncio.Event()

    async def send(message: Any) -> None:
        writing.set()
        try:
            await asyncio.sleep(10)  # a write that takes its time...
        except asyncio.CancelledError:
            await release.wait()  # ...and to give up
            raise

    reply = Reply(send)
    reply.keep_alive(0.001, lambda: "loading m")
    await writing.wait()
    stopping = asyncio.ensure_future(reply.quiet())
    await asyncio.sleep(0.01)
    stopping.cancel()  # the client left while the heartbeat was being stopped
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await stopping
