"""Remote entries: the key from the named variable on every call, per-entry timeouts, and the
health check that marks a remote down and fails its requests fast."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydantic import ValidationError

from conftest import write_json
from imageworks.backends.base import BackendNotReady, Outage, RemoteDown, Target
from imageworks.backends.external import ExternalBackend, external_target
from imageworks.chat_proxy.catalog import Catalog
from imageworks.chat_proxy.config import ProxySettings
from imageworks.chat_proxy.forwarding import Forwarder, new_session
from imageworks.chat_proxy.protocol import BackendTimeout, BackendUnavailable, BadGateway
from imageworks.chat_proxy.requests import parse_chat_request
from imageworks.registry.installed import (
    HttpServedModels,
    Installed,
    ServedApi,
    ServedModelsQuery,
    Unanswered,
    installed_report,
)
from imageworks.registry.schema import RegistryEntry
from imageworks.registry.store import RegistryStore
from support.scripted_upstream import ScriptedUpstream

pytestmark = pytest.mark.timeout(30)

KEY = "sk-remote-0123456789abcdef"
VARIABLE = "NODE_B_KEY"
OLLAMA = "http://127.0.0.1:9"


def remote(base_url: str, model: str = "echo", **config: object) -> RegistryEntry:
    return RegistryEntry.model_validate(
        {
            "name": "remote",
            "backend": "external",
            "served_model_id": model,
            "backend_config": {"base_url": base_url, "api_key_env": VARIABLE, **config},
        }
    )


def chat(stream: bool = False) -> Any:
    body = {"messages": [{"role": "user", "content": "hi"}], "model": "x", "stream": stream}
    return parse_chat_request(json.dumps(body).encode())


@pytest.fixture
def upstream() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as server:
        yield server


@pytest.fixture
async def forwarder() -> AsyncIterator[Forwarder]:
    session = new_session()
    yield Forwarder(session, backend_timeout_s=30, stream_idle_timeout_s=30)
    await session.close()


# -- the key ------------------------------------------------------------------------------------


def test_remote_target_carries_the_key_but_its_repr_does_not() -> None:
    target = external_target(remote("http://b:8100/v1"), OLLAMA, None, {VARIABLE: KEY})
    assert dict(target.headers) == {"Authorization": f"Bearer {KEY}"}
    assert target.key_env == VARIABLE
    assert KEY not in repr(target)


def test_remote_target_without_its_variable_is_not_ready_naming_the_variable() -> None:
    with pytest.raises(BackendNotReady) as caught:
        external_target(remote("http://b:8100/v1"), OLLAMA, None, {})
    assert VARIABLE in str(caught.value)
    assert "remote" in str(caught.value)


def test_entry_without_a_key_variable_sends_no_authorization() -> None:
    entry = RegistryEntry.model_validate(
        {"name": "plain", "backend": "external", "backend_config": {"base_url": "http://b/v1"}}
    )
    assert external_target(entry, OLLAMA, None, {VARIABLE: KEY}).headers == ()


def test_api_key_env_refuses_what_looks_like_a_key_not_a_name() -> None:
    with pytest.raises(ValidationError) as caught:
        remote("http://b/v1", api_key_env="sk-abc-123")
    assert "api_key_env" in str(caught.value)
    assert remote("http://b/v1", api_key_env="$NODE_B_KEY").backend_config.api_key_env == VARIABLE


@pytest.mark.parametrize(
    "field",
    ["request_timeout_s", "stream_idle_timeout_s", "connect_timeout_s", "health_check_interval_s"],
)
def test_remote_timeouts_must_be_positive(field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        remote("http://b/v1", "echo", **{field: 0.0})
    assert field in str(caught.value)


async def test_the_key_reaches_the_remote_on_plain_and_streamed_calls(
    upstream: ScriptedUpstream, forwarder: Forwarder
) -> None:
    target = external_target(remote(upstream.url + "/v1"), OLLAMA, None, {VARIABLE: KEY})
    answer = await forwarder.complete(target, chat())
    assert answer.parsed["choices"][0]["message"]["role"] == "assistant"
    stream = await forwarder.open_stream(target, chat(stream=True))
    try:
        events = [event async for event in stream.events()]
    finally:
        await stream.aclose()
    assert events[-1].strip() == b"data: [DONE]"
    assert [h.get("authorization") for h in upstream.headers] == [f"Bearer {KEY}"] * 2


async def _refusing(request: web.BaseRequest) -> web.StreamResponse:
    # A server that echoes what it refused: the proxy must not pass that text on.
    said = {"error": {"message": f"bad key {request.headers.get('Authorization')}"}}
    return web.json_response(said, status=401)


@pytest.fixture
async def refusing_remote() -> AsyncIterator[str]:
    server = web.Server(_refusing)
    runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    await runner.cleanup()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_refused_key_is_a_502_naming_the_variable_not_the_key(
    refusing_remote: str, forwarder: Forwarder, stream: bool
) -> None:
    target = external_target(remote(refusing_remote), OLLAMA, None, {VARIABLE: KEY})
    call = forwarder.open_stream if stream else forwarder.complete
    with pytest.raises(BadGateway) as caught:
        await call(target, chat(stream=stream))
    error = caught.value
    assert error.code == "remote_key_refused"
    assert VARIABLE in error.message
    assert "401" in error.message
    assert KEY not in json.dumps(error.body())


# -- per-entry timeouts -------------------------------------------------------------------------


async def test_a_slow_remote_times_out_at_the_entrys_request_timeout(
    upstream: ScriptedUpstream, forwarder: Forwarder
) -> None:
    entry = remote(upstream.url + "/v1", model="hang", request_timeout_s=0.2)
    target = external_target(entry, OLLAMA, None, {VARIABLE: KEY})
    with pytest.raises(BackendTimeout) as caught:
        await forwarder.complete(target, chat())
    assert caught.value.code == "backend_timeout"
    assert "0.2s" in caught.value.message  # the entry's limit, not the proxy's 30 s


async def test_a_silent_stream_ends_at_the_entrys_idle_timeout(
    upstream: ScriptedUpstream, forwarder: Forwarder
) -> None:
    entry = remote(upstream.url + "/v1", model="hang", stream_idle_timeout_s=0.2)
    target = external_target(entry, OLLAMA, None, {VARIABLE: KEY})
    stream = await forwarder.open_stream(target, chat(stream=True))
    received: list[bytes] = []

    async def read_all() -> None:
        async for event in stream.events():
            received.append(event)

    try:
        with pytest.raises(BackendTimeout) as caught:
            await read_all()
    finally:
        await stream.aclose()
    assert caught.value.code == "stream_idle_timeout"
    assert "0.2s" in caught.value.message
    assert len(received) == 1  # the role chunk came; then nothing


async def test_a_remote_that_never_accepts_times_out_at_the_entrys_connect_timeout(
    forwarder: Forwarder,
) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # never accepted: once its queue is full, new connections hang
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(4)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
            entry = remote(f"http://127.0.0.1:{port}/v1", connect_timeout_s=0.2)
            target = external_target(entry, OLLAMA, None, {VARIABLE: KEY})
            with pytest.raises(BackendUnavailable) as caught:
                await forwarder.complete(target, chat())
        finally:
            for filler in fillers:
                filler.close()
    assert caught.value.code == "backend_unreachable"
    assert "timeout" in caught.value.message.lower()  # not the proxy's 30 s request limit


# -- the health check ---------------------------------------------------------------------------


def test_health_check_sends_the_key_and_reads_the_models(upstream: ScriptedUpstream) -> None:
    source = HttpServedModels(5, environ={VARIABLE: KEY})
    query = ServedModelsQuery(ServedApi.OPENAI, upstream.url + "/v1", VARIABLE)
    served = source.served_models(query)
    assert isinstance(served, frozenset)
    assert "echo" in served


def test_health_check_without_the_variable_says_so() -> None:
    source = HttpServedModels(5, environ={})
    answer = source.served_models(ServedModelsQuery(ServedApi.OPENAI, "http://b/v1", VARIABLE))
    assert isinstance(answer, Unanswered)
    assert answer.down
    assert VARIABLE in answer.reason


async def test_health_check_names_the_variable_whose_key_was_refused(
    refusing_remote: str,
) -> None:
    source = HttpServedModels(5, environ={VARIABLE: KEY})
    query = ServedModelsQuery(ServedApi.OPENAI, refusing_remote, VARIABLE)
    # In a thread: the refusing remote runs on this test's event loop.
    answer = await asyncio.to_thread(source.served_models, query)
    assert isinstance(answer, Unanswered)
    assert answer.down
    assert VARIABLE in answer.reason
    assert "401" in answer.reason
    assert KEY not in answer.reason


class SwitchableSource:
    """A remote whose health the test decides."""

    def __init__(self) -> None:
        self.answer: frozenset[str] | Unanswered = frozenset({"echo"})
        self.asked = 0

    def served_models(self, query: ServedModelsQuery) -> frozenset[str] | Unanswered:
        self.asked += 1
        return self.answer


def test_a_down_remote_is_unreachable_with_its_reason_while_ollama_stays_unknown(
    tmp_path: Path,
) -> None:
    source = SwitchableSource()
    source.answer = Unanswered("cannot connect (ConnectError)", down=True)
    ollama = RegistryEntry.model_validate(
        {"name": "tag", "backend": "ollama", "served_model_id": "qwen3:8b"}
    )
    report = installed_report([remote("http://b/v1"), ollama], tmp_path, source, OLLAMA)
    assert report.states == {"remote": Installed.UNREACHABLE, "tag": Installed.UNKNOWN}
    assert report.reasons == {"remote": "cannot connect (ConnectError)"}


def test_a_remote_answering_in_a_way_we_cannot_read_is_not_down(tmp_path: Path) -> None:
    source = SwitchableSource()
    source.answer = Unanswered("/models answered HTTP 404", down=False)
    report = installed_report([remote("http://b/v1")], tmp_path, source, OLLAMA)
    assert report.states == {"remote": Installed.UNKNOWN}


def _catalog(tmp_path: Path, source: SwitchableSource) -> Catalog:
    entry = remote("http://b/v1", health_check_interval_s=0.1).to_json()
    write_json(tmp_path / "model_registry.curated.json", [entry])
    settings = ProxySettings(log_path=tmp_path / "log", installed_refresh_s=30)
    return Catalog(RegistryStore(tmp_path), settings, ollama_host=OLLAMA, served_source=source)


async def _until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.02)


async def test_catalog_marks_a_remote_down_keeps_it_listed_and_brings_it_back(
    tmp_path: Path,
) -> None:
    source = SwitchableSource()
    catalog = _catalog(tmp_path, source)
    checking = asyncio.create_task(catalog.keep_installed_states_fresh())
    try:
        await asyncio.wait_for(_until(lambda: source.asked >= 1), 10)
        assert (await catalog.view()).installed["remote"] is Installed.YES
        assert catalog.outage("remote") is None

        source.answer = Unanswered("cannot connect (ConnectError)", down=True)
        asked = source.asked
        # The entry's own interval (0.1 s), not the proxy-wide 30 s, brings the next checks.
        await asyncio.wait_for(_until(lambda: catalog.outage("remote") is not None), 10)
        first = catalog.outage("remote")
        assert first is not None
        assert first.reason == "cannot connect (ConnectError)"
        await asyncio.wait_for(_until(lambda: source.asked >= asked + 3), 10)
        again = catalog.outage("remote")
        assert again is not None
        assert again.since == first.since
        # Still listed (CHAT_PROXY_INCLUDE_NON_INSTALLED is off), with its state.
        listed = json.loads((await catalog.reload()).listing)["data"]
        assert [item["extensions"]["installed"] for item in listed] == ["unreachable"]

        source.answer = frozenset({"echo"})
        await asyncio.wait_for(_until(lambda: catalog.outage("remote") is None), 10)
    finally:
        checking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await checking


async def test_catalog_gives_the_entries_of_a_down_ollama_an_outage_and_keeps_them_unlisted(
    tmp_path: Path,
) -> None:
    tag = {"name": "tag", "backend": "ollama", "served_model_id": "qwen3:8b"}
    write_json(tmp_path / "model_registry.curated.json", [tag])
    settings = ProxySettings(log_path=tmp_path / "log", installed_refresh_s=0.1)
    source = SwitchableSource()
    source.answer = Unanswered("cannot connect (ConnectError)", down=True)
    catalog = Catalog(RegistryStore(tmp_path), settings, ollama_host=OLLAMA, served_source=source)
    checking = asyncio.create_task(catalog.keep_installed_states_fresh())
    try:
        await asyncio.wait_for(_until(lambda: catalog.outage("tag") is not None), 10)
        outage = catalog.outage("tag")
        assert outage is not None
        assert outage.reason == f"Ollama at {OLLAMA} does not answer: cannot connect (ConnectError)"
        assert outage.fix == "start it or set IMAGEWORKS_OLLAMA_HOST"
        view = await catalog.view()
        assert view.installed["tag"] is Installed.UNKNOWN  # not listed, as before
        assert json.loads(view.listing)["data"] == []

        source.answer = frozenset({"qwen3:8b"})
        await asyncio.wait_for(_until(lambda: catalog.outage("tag") is None), 10)
    finally:
        checking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await checking


async def test_a_lease_of_a_down_remote_fails_fast_naming_it_and_since_when() -> None:
    since = time.time() - 60
    outage = Outage(since, "cannot connect (ConnectError)", time.time() + 5)
    backend = ExternalBackend(
        OLLAMA,
        None,
        environ={VARIABLE: KEY},
        outage=lambda name: outage if name == "remote" else None,
    )
    with pytest.raises(RemoteDown) as caught:
        async with backend.lease(remote("http://b:8100/v1")):
            pytest.fail("a down remote must not be leased")
    error = caught.value
    assert error.code == "backend_unreachable"
    assert "external:remote" in str(error)
    assert "http://b:8100/v1" in str(error)
    assert "cannot connect" in str(error)
    assert time.strftime("%Y-%m-%dT%H:%M", time.gmtime(since)) in str(error)
    assert 1 <= error.retry_after_s <= 5
    assert KEY not in str(error)


async def test_a_lease_of_a_healthy_remote_is_its_target() -> None:
    backend = ExternalBackend(OLLAMA, None, environ={VARIABLE: KEY})
    async with backend.lease(remote("http://b:8100/v1")) as target:
        assert isinstance(target, Target)
        assert target.base_url == "http://b:8100/v1"
