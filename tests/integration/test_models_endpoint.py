"""GET /v1/models and GET /v1/health on the real app, over HTTP."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from conftest import write_json
from support.proxy_server import ProxyServer
from support.scripted_upstream import ScriptedUpstream

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as server:
        yield server


@pytest.fixture
def registry(tmp_path: Path, upstream: ScriptedUpstream) -> Path:
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "a.gguf").write_bytes(b"GGUF")
    base = {"backend": "external", "backend_config": {"base_url": f"{upstream.url}/v1"}}

    def external(name: str, **fields: Any) -> dict[str, Any]:
        return {"name": name, **base, "served_model_id": "echo", **fields}

    directory = tmp_path / "configs"
    write_json(
        directory / "model_registry.curated.json",
        [
            external(
                "llama_12.2b_(Q4_K_M)",
                display_name="llama 12.2b",
                quantization="q4_k_m",
                download_path=str(weights / "a.gguf"),
                download_format="gguf",
                capabilities={"vl": True, "function_calling": True},
            ),
            external("twin_a", display_name="twin", download_path=str(weights / "a.gguf")),
            external("twin_b", display_name="twin", download_path=str(weights / "a.gguf")),
            {"name": "ghost", "backend": "llamacpp", "download_path": str(weights / "gone.gguf")},
            external("old", deprecated=True, download_path=str(weights / "a.gguf")),
            external("served_by_id"),  # no files: installed when the backend lists `echo`
            external(
                "Qwen/Qwen2.5-7B_(Q4_K_M)",  # an id with a slash, spaces and parentheses
                download_path=str(weights / "a.gguf"),
                downloaded_at="2025-01-09T18:00:00+00:00",
            ),
            external(
                "dated_in_metadata",
                download_path=str(weights / "a.gguf"),
                metadata={"downloaded_at": 1736445600},
            ),
        ],
    )
    return directory


def ids(proxy: ProxyServer) -> list[str]:
    body = httpx.get(f"{proxy.url}/v1/models").json()
    assert body["object"] == "list"
    for item in body["data"]:
        assert set(item) == {"id", "object", "created", "owned_by", "extensions", "status"}
        assert item["object"] == "model"
        assert isinstance(item["created"], int)
    return [item["id"] for item in body["data"]]


def test_models_lists_installed_entries_under_display_names(registry: Path, tmp_path: Path) -> None:
    with ProxyServer(registry, tmp_path) as proxy:
        listed = ids(proxy)
        assert "llama 12.2b (Q4 K M)" in listed
        assert {"twin_a", "twin_b"} <= set(listed)  # a shared display name is not an id
        assert "ghost" not in listed  # its weights are missing
        assert "old" not in listed  # deprecated
        assert len(listed) == len(set(listed))

        deadline = time.monotonic() + 20  # the backend check runs in the background
        while "served by id" not in ids(proxy):
            assert time.monotonic() < deadline, "the backend-served entry never appeared"
            time.sleep(0.1)


def _llama_item(proxy: ProxyServer) -> dict[str, Any]:
    items = httpx.get(f"{proxy.url}/v1/models").json()["data"]
    return next(i for i in items if i["extensions"]["logical_id"] == "llama_12.2b_(Q4_K_M)")


def test_models_extension_metadata_and_decorations(registry: Path, tmp_path: Path) -> None:
    with ProxyServer(registry, tmp_path, schema_version=3) as proxy:
        item = _llama_item(proxy)
    extensions = item["extensions"]
    assert extensions["logical_id"] == "llama_12.2b_(Q4_K_M)"
    assert extensions["capabilities"]["vision"] is True
    assert extensions["capabilities"]["tools"] is True
    assert extensions["modalities"] == ["text", "vision"]
    assert extensions["schema_version"] == 3
    assert extensions["backend"] is None
    assert extensions["quantization"] is None

    with ProxyServer(registry, tmp_path, suppress_decorations=False) as proxy:
        item = _llama_item(proxy)
    assert item["extensions"]["backend"] == "external"
    assert item["extensions"]["format"] == "gguf"
    assert item["extensions"]["quantization"] == "q4_k_m"


def test_every_listed_id_resolves_to_its_entry(registry: Path, tmp_path: Path) -> None:
    with ProxyServer(registry, tmp_path, include_non_installed=True) as proxy:
        listed = ids(proxy)
        assert "ghost" in listed
        for model_id in listed:
            response = httpx.post(
                f"{proxy.url}/v1/chat/completions",
                json={"model": model_id, "messages": [{"role": "user", "content": "x"}]},
            )
            if model_id == "ghost":  # resolved, but its weights are missing: 503, not 404
                assert response.status_code == 503
                assert "gone.gguf not found" in response.json()["error"]["message"]
            else:
                assert response.status_code == 200, (model_id, response.text)
        deprecated = httpx.post(
            f"{proxy.url}/v1/chat/completions",
            json={"model": "old", "messages": [{"role": "user", "content": "x"}]},
        )
        assert deprecated.status_code == 404


def test_models_does_not_wait_for_a_silent_backend(tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts connections and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        directory = tmp_path / "configs"
        write_json(
            directory / "model_registry.curated.json",
            [
                {
                    "name": "stuck",
                    "backend": "ollama",
                    "backend_config": {"host": "127.0.0.1", "port": port},
                }
            ],
        )
        with ProxyServer(directory, tmp_path, installed_refresh_s=60) as proxy:
            # The background check is stuck on the silent backend; the listing is not.
            response = httpx.get(f"{proxy.url}/v1/models", timeout=1.0)
            health = httpx.get(f"{proxy.url}/v1/health", timeout=1.0)
    assert response.json() == {"object": "list", "data": []}
    assert health.json()["status"] == "ok"


def test_health_reports_uptime_entries_and_active_backend(registry: Path, tmp_path: Path) -> None:
    with ProxyServer(registry, tmp_path) as proxy:
        health = httpx.get(f"{proxy.url}/v1/health").json()
    assert health["status"] == "ok"
    assert health["uptime_s"] >= 0
    assert health["registry_entries"] == 8
    assert health["active_backend"] is None


def listed_models(proxy: ProxyServer) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = httpx.get(f"{proxy.url}/v1/models").json()["data"]
    return data


def sdk(proxy: ProxyServer) -> OpenAI:
    return OpenAI(base_url=f"{proxy.url}/v1", api_key="EMPTY", max_retries=0)


def test_models_retrieve_returns_each_listed_model_object(registry: Path, tmp_path: Path) -> None:
    with ProxyServer(registry, tmp_path, include_non_installed=True) as proxy:
        deadline = time.monotonic() + 20  # the backend check in the background changes a model
        while "unknown" in {item["extensions"]["installed"] for item in listed_models(proxy)}:
            assert time.monotonic() < deadline, "the backend-served entry was never checked"
            time.sleep(0.1)
        listed = listed_models(proxy)
        assert "Qwen/Qwen2.5-7B (Q4 K M)" in [item["id"] for item in listed]
        client = sdk(proxy)
        for item in listed:  # the SDK percent-encodes the id: %20, %2F; ( and ) as they are
            model = client.models.retrieve(item["id"])
            assert model.to_dict() == item


def test_models_retrieve_decodes_a_percent_encoded_id(registry: Path, tmp_path: Path) -> None:
    with ProxyServer(registry, tmp_path) as proxy:
        response = httpx.get(f"{proxy.url}/v1/models/llama%2012.2b%20%28Q4%20K%20M%29")
    assert response.status_code == 200
    assert response.json()["id"] == "llama 12.2b (Q4 K M)"


def test_models_retrieve_of_an_unknown_id_is_an_openai_404(registry: Path, tmp_path: Path) -> None:
    with ProxyServer(registry, tmp_path) as proxy:
        with pytest.raises(openai.NotFoundError) as raised:
            sdk(proxy).models.retrieve("no such model")
        # another name of a listed model (its logical name) is not its id, but points to it
        other_name = httpx.get(f"{proxy.url}/v1/models/llama_12.2b_(Q4_K_M)")
    assert raised.value.status_code == 404
    assert raised.value.code == "model_not_found"
    assert set(raised.value.body) == {"message", "type", "param", "code"}  # type: ignore[arg-type]
    assert other_name.status_code == 404
    error = other_name.json()["error"]
    assert error["code"] == "model_not_found"
    assert "Did you mean: llama 12.2b (Q4 K M)?" in error["message"]


def test_models_created_is_when_the_entry_was_downloaded_or_registered(
    registry: Path, tmp_path: Path
) -> None:
    registered = int((registry / "model_registry.curated.json").stat().st_mtime)
    with ProxyServer(registry, tmp_path) as proxy:
        items = httpx.get(f"{proxy.url}/v1/models").json()["data"]
    created = {item["extensions"]["logical_id"]: item["created"] for item in items}
    assert created["Qwen/Qwen2.5-7B_(Q4_K_M)"] == 1736445600  # downloaded_at, ISO 8601
    assert created["dated_in_metadata"] == 1736445600  # metadata.downloaded_at, Unix seconds
    assert created["llama_12.2b_(Q4_K_M)"] == registered  # no date: the registry file's
