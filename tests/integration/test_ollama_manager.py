"""OllamaManager against a fake Ollama with real load/unload state: unload everything and wait
until /api/ps is empty, bounded; say clearly when Ollama is down, hanging or stuck."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from imageworks.backends.base import BackendNotReady
from imageworks.backends.ollama import (
    OllamaError,
    OllamaManager,
    OllamaUnavailable,
    OllamaUnloadTimeout,
)
from support.fake_ollama import VERSION, FakeOllama, dead_url

pytestmark = [pytest.mark.integration, pytest.mark.timeout(10)]

QWEN = "qwen3:8b"
LLAVA = "llava:7b"
GEMMA = "gemma3:4b"


@pytest.fixture
def ollama() -> Iterator[FakeOllama]:
    with FakeOllama(installed=[QWEN, LLAVA, GEMMA]) as server:
        yield server


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as http:
        yield http


def manager(url: str, client: httpx.AsyncClient, **bounds: float) -> OllamaManager:
    settings: dict[str, float] = {"request_timeout_s": 2.0, "poll_interval_s": 0.02}
    return OllamaManager(url, client, **(settings | bounds))


def unload_posts(calls: list[tuple[str, str, Any]]) -> list[tuple[str, Any]]:
    return [(path, body) for method, path, body in calls if method == "POST"]


def ps_polls(calls: list[tuple[str, str, Any]]) -> int:
    return sum(1 for method, path, _ in calls if (method, path) == ("GET", "/api/ps"))


async def test_version_reports_ollamas_version(
    ollama: FakeOllama, client: httpx.AsyncClient
) -> None:
    assert await manager(ollama.url, client).version() == VERSION


async def test_installed_models_lists_tags(ollama: FakeOllama, client: httpx.AsyncClient) -> None:
    assert await manager(ollama.url + "/", client).installed_models() == [QWEN, LLAVA, GEMMA]


async def test_loaded_models_lists_ps_in_order(
    ollama: FakeOllama, client: httpx.AsyncClient
) -> None:
    ollama.load(LLAVA)
    ollama.load(QWEN)
    assert await manager(ollama.url, client).loaded_models() == [LLAVA, QWEN]


async def test_unload_all_with_nothing_loaded_sends_no_unload(
    ollama: FakeOllama, client: httpx.AsyncClient
) -> None:
    assert await manager(ollama.url, client).unload_all() == []
    assert ollama.unload_requests == []
    assert unload_posts(ollama.calls) == []


async def test_unload_all_unloads_each_model_in_ps_order(
    ollama: FakeOllama, client: httpx.AsyncClient
) -> None:
    for name in (GEMMA, QWEN, LLAVA):
        ollama.load(name)

    assert await manager(ollama.url, client).unload_all() == [GEMMA, QWEN, LLAVA]
    assert ollama.unload_requests == [GEMMA, QWEN, LLAVA]
    assert unload_posts(ollama.calls) == [
        ("/api/generate", {"model": name, "keep_alive": 0}) for name in (GEMMA, QWEN, LLAVA)
    ]
    assert ollama.loaded == set()


async def test_unload_all_returns_only_after_ps_is_empty(client: httpx.AsyncClient) -> None:
    with FakeOllama(installed=[QWEN, LLAVA], unload_delay_s=0.3) as ollama:
        ollama.load(QWEN)
        ollama.load(LLAVA)

        assert await manager(ollama.url, client).unload_all() == [QWEN, LLAVA]

        assert ollama.loaded == set()
        calls = ollama.calls
        last_unload = max(i for i, (method, _, _) in enumerate(calls) if method == "POST")
        after = calls[last_unload + 1 :]
        assert ps_polls(after) >= 2, "it polled /api/ps while the models were leaving"
        assert after[-1][:2] == ("GET", "/api/ps")


async def test_unload_all_also_unloads_a_model_loaded_while_waiting(
    ollama: FakeOllama, client: httpx.AsyncClient
) -> None:
    ollama.set_unload_delay(0.5)
    ollama.load(QWEN)
    unloading = asyncio.create_task(manager(ollama.url, client).unload_all())
    while not ollama.unload_requests:
        await asyncio.sleep(0.005)
    ollama.load(LLAVA)  # another Ollama client loads a model meanwhile

    assert await unloading == [QWEN, LLAVA]
    assert ollama.unload_requests == [QWEN, LLAVA]
    assert ollama.loaded == set()


async def test_unload_all_names_a_model_that_never_leaves(
    ollama: FakeOllama, client: httpx.AsyncClient
) -> None:
    ollama.set_unload_delay(60)
    ollama.load(QWEN)

    with pytest.raises(OllamaUnloadTimeout, match=QWEN) as caught:
        await manager(ollama.url, client, unload_timeout_s=0.2).unload_all()

    assert isinstance(caught.value, BackendNotReady)
    assert ollama.unload_requests == [QWEN], "asked once, then only polled"
    assert ollama.loaded == {QWEN}


async def test_unload_all_falls_back_to_chat_then_names_a_refused_model(
    ollama: FakeOllama, client: httpx.AsyncClient
) -> None:
    ollama.load("ghost:1b")  # loaded by someone, unknown to /api/tags: both unloads answer 404
    ollama.load(QWEN)

    with pytest.raises(OllamaError, match=r"refused to unload ghost:1b \(HTTP 404") as caught:
        await manager(ollama.url, client).unload_all()

    assert not isinstance(caught.value, OllamaUnavailable)
    assert unload_posts(ollama.calls) == [
        ("/api/generate", {"model": "ghost:1b", "keep_alive": 0}),
        ("/api/chat", {"model": "ghost:1b", "messages": [], "keep_alive": 0}),
        ("/api/generate", {"model": QWEN, "keep_alive": 0}),
    ]
    assert ollama.loaded == {"ghost:1b"}


@pytest.mark.parametrize("method", ["version", "loaded_models", "installed_models", "unload_all"])
async def test_ollama_down_is_unavailable_naming_the_url(
    client: httpx.AsyncClient, method: str
) -> None:
    url = dead_url()
    ollama = manager(url, client, request_timeout_s=1.0)

    with pytest.raises(OllamaUnavailable, match=url) as caught:
        await getattr(ollama, method)()

    assert isinstance(caught.value, BackendNotReady)


@pytest.mark.parametrize("method", ["version", "loaded_models", "unload_all"])
async def test_hanging_ollama_is_unavailable_after_the_request_timeout(
    ollama: FakeOllama, client: httpx.AsyncClient, method: str
) -> None:
    ollama.stop_answering()

    with pytest.raises(OllamaUnavailable, match="timed out"):
        await getattr(manager(ollama.url, client, request_timeout_s=0.2), method)()

    assert ollama.calls, "the request reached Ollama before it hung"
