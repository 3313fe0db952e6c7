"""Every listed model's `status`, as llama.cpp's router shows it: one pure function for both
listings, and a catalog listing that rewrites only what a slot change concerns."""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from conftest import write_json
from imageworks.backends.slot import Phase
from imageworks.backends.slot_report import SlotView
from imageworks.chat_proxy.catalog import Catalog
from imageworks.chat_proxy.config import ProxySettings
from imageworks.chat_proxy.model_router import status_events
from imageworks.chat_proxy.model_status import StatusRules, entry_status, holder_name
from imageworks.registry.installed import Installed
from imageworks.registry.schema import RegistryEntry
from imageworks.registry.store import RegistryStore

pytestmark = pytest.mark.timeout(10)

RULES = StatusRules(
    vllm_single_port=True, ollama_host="http://127.0.0.1:11434", loopback_alias=None
)
OLLAMA_HOLDER = "@ollama http://127.0.0.1:11434"


def make_entry(name: str, backend: str, **fields: Any) -> RegistryEntry:
    return RegistryEntry.model_validate({"name": name, "backend": backend, **fields})


def slot(
    holder: str | None, phase: Phase | None, step: str | None = None, **failures: str
) -> SlotView:
    return SlotView(1, holder, phase, step, MappingProxyType(failures))


LLAMA = make_entry("llama", "llamacpp")


@pytest.mark.parametrize(
    ("view", "expected"),
    [
        (SlotView(), {"value": "unloaded"}),
        (slot("llama", Phase.STARTING, "spawning"), {"value": "loading", "step": "spawning"}),
        (slot("llama", Phase.STARTING), {"value": "loading", "step": "starting"}),
        (slot("llama", Phase.READY), {"value": "loaded"}),
        (slot("llama", Phase.STOPPING), {"value": "unloaded"}),
        (slot("other", Phase.READY), {"value": "unloaded"}),
        (
            slot(None, None, llama="llama could not be started: no such file"),
            {
                "value": "unloaded",
                "failed": True,
                "error": "llama could not be started: no such file",
            },
        ),
    ],
    ids=["idle", "starting", "starting-no-step", "ready", "stopping", "other-holder", "failed"],
)
def test_status_of_a_managed_entry_follows_the_slot(
    view: SlotView, expected: dict[str, Any]
) -> None:
    assert entry_status(LLAMA, Installed.YES, RULES, view) == expected


def test_status_of_vllm_is_managed_only_with_single_port_orchestration() -> None:
    vllm = make_entry("big", "vllm", backend_config={"base_url": "http://gpu-box:8000/v1"})
    assert entry_status(vllm, Installed.YES, RULES, slot("big", Phase.READY)) == {"value": "loaded"}
    elsewhere = StatusRules(False, RULES.ollama_host, None)
    assert holder_name(vllm, elsewhere) is None
    assert entry_status(vllm, Installed.YES, elsewhere, SlotView()) == {"value": "loaded"}


def test_status_of_an_ollama_entry_follows_its_ollama_holding_the_slot() -> None:
    tag = make_entry("qwen", "ollama", served_model_id="qwen3:8b")
    assert holder_name(tag, RULES) == OLLAMA_HOLDER
    assert entry_status(tag, Installed.YES, RULES, SlotView()) == {"value": "unloaded"}
    assert entry_status(tag, Installed.YES, RULES, slot(OLLAMA_HOLDER, Phase.READY)) == {
        "value": "loaded"
    }
    assert entry_status(tag, Installed.YES, RULES, slot(OLLAMA_HOLDER, Phase.STARTING)) == {
        "value": "loading",
        "step": "starting",
    }


@pytest.mark.parametrize("state", [Installed.NO, Installed.UNKNOWN, Installed.UNREACHABLE])
def test_status_of_a_server_that_cannot_answer_is_failed(state: Installed) -> None:
    remote = make_entry("remote", "external", backend_config={"base_url": "http://box:1234/v1"})
    status = entry_status(remote, state, RULES, SlotView())
    assert status["value"] == "unloaded"
    assert status["failed"] is True
    assert status["error"].startswith("its ")


def test_status_of_a_reachable_external_server_is_loaded() -> None:
    remote = make_entry("remote", "external", backend_config={"base_url": "http://box:1234/v1"})
    assert holder_name(remote, RULES) is None
    assert entry_status(remote, Installed.YES, RULES, slot("llama", Phase.READY)) == {
        "value": "loaded"
    }


# -- the catalog's listing ------------------------------------------------------------------------


class SlotStub:
    def __init__(self) -> None:
        self.current = SlotView()

    def __call__(self) -> SlotView:
        return self.current


@pytest.fixture
def catalog(tmp_path: Path) -> tuple[Catalog, SlotStub]:
    weights = tmp_path / "weights.gguf"
    weights.write_bytes(b"GGUF")
    write_json(
        tmp_path / "model_registry.curated.json",
        [
            {"name": name, "backend": "llamacpp", "backend_config": {"model_path": str(weights)}}
            for name in ("alpha", "beta", "gamma")
        ],
    )
    settings = ProxySettings(log_path=tmp_path / "log")
    built = Catalog(
        RegistryStore(tmp_path), settings, ollama_host="http://127.0.0.1:9", served_source=None
    )
    stub = SlotStub()
    built.watch_slot(stub)
    return built, stub


def statuses(listing: bytes) -> dict[str, dict[str, Any]]:
    return {item["id"]: item["status"] for item in json.loads(listing)["data"]}


async def test_listing_shows_every_model_unloaded_while_the_slot_is_idle(
    catalog: tuple[Catalog, SlotStub],
) -> None:
    view = await catalog[0].view()
    assert statuses(view.listing) == {
        name: {"value": "unloaded"} for name in ("alpha", "beta", "gamma")
    }


async def test_listing_and_model_objects_show_the_holder(catalog: tuple[Catalog, SlotStub]) -> None:
    built, stub = catalog
    stub.current = SlotView(1, "beta", Phase.READY)
    view = await built.view()
    assert statuses(view.listing) == {
        "alpha": {"value": "unloaded"},
        "beta": {"value": "loaded"},
        "gamma": {"value": "unloaded"},
    }
    assert json.loads(built.model(view, "beta"))["status"] == {"value": "loaded"}
    stub.current = SlotView(2)
    assert statuses((await built.view()).listing)["beta"] == {"value": "unloaded"}


async def test_listing_is_reused_while_the_slot_changes_nothing_shown(
    catalog: tuple[Catalog, SlotStub],
) -> None:
    built, stub = catalog
    stub.current = SlotView(1, "beta", Phase.READY)
    first = await built.view()
    stub.current = SlotView(2, "beta", Phase.READY)  # a lease ended: nothing shown changed
    assert (await built.view()) is first
    stub.current = SlotView(3, "beta", Phase.STOPPING)
    assert (await built.view()) is not first


async def test_listing_shows_a_failed_start(catalog: tuple[Catalog, SlotStub]) -> None:
    built, stub = catalog
    stub.current = SlotView(1, failures=MappingProxyType({"gamma": "gamma: weights missing"}))
    status = statuses((await built.view()).listing)["gamma"]
    assert status == {"value": "unloaded", "failed": True, "error": "gamma: weights missing"}


# -- the event stream's events --------------------------------------------------------------------


def events(raw: list[bytes]) -> list[dict[str, Any]]:
    assert all(event.startswith(b"data: ") and event.endswith(b"\n\n") for event in raw)
    return [json.loads(event[6:]) for event in raw]


async def test_events_start_with_every_model_then_only_what_changed(
    catalog: tuple[Catalog, SlotStub],
) -> None:
    built, stub = catalog
    sent: dict[str, bytes] = {}
    first = events(list(status_events(sent, await built.view())))
    assert [(e["model"], e["event"], e["data"]) for e in first] == [
        (name, "status_change", {"status": "unloaded"}) for name in ("alpha", "beta", "gamma")
    ]
    assert list(status_events(sent, await built.view())) == []  # nothing changed
    stub.current = SlotView(1, "beta", Phase.STARTING, "spawning")
    [loading] = events(list(status_events(sent, await built.view())))
    assert loading == {
        "model": "beta",
        "event": "status_change",
        "data": {"status": "loading", "step": "spawning", "progress": {"current": "spawning"}},
    }
    stub.current = SlotView(2, failures=MappingProxyType({"beta": "beta: exited with 3"}))
    [failed] = events(list(status_events(sent, await built.view())))
    assert failed["data"] == {"status": "unloaded", "failed": True, "error": "beta: exited with 3"}
