"""Malformed requests through the real proxy, in front of the demo backend (the real console
script and llama.cpp) and of the scripted upstream: each is a 400 that names the field, a body
nested too deep is a 400, and what a backend rejects as bad input reaches the client as a 400,
not a 502. Unknown fields reach the backend untouched."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import make_demo_workspace, write_json
from support.proxy_process import RunningProxy, Workspace, processes_listening_on
from support.proxy_server import ProxyServer
from support.scripted_upstream import SCENARIOS, ScriptedUpstream

pytestmark = pytest.mark.timeout(180)

SMOL = "smollm2 135m (Q4 1)"


@dataclass(frozen=True)
class Proxy:
    url: str
    model: str  # a model it serves


@contextlib.contextmanager
def _demo_proxy(root: Path, demo_models: Path, **env: str) -> Iterator[RunningProxy]:
    make_demo_workspace(root, demo_models)
    workspace = Workspace(root, extra_env=env)
    running = workspace.start_proxy()
    try:
        yield running
    finally:
        running.terminate()
        for pid in processes_listening_on(workspace.model_port):  # never leave a model behind
            os.killpg(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, demo_models: Path) -> Iterator[Proxy]:
    """The demo registry behind the real console script, llama-server serving its models."""
    with _demo_proxy(tmp_path_factory.mktemp("demo"), demo_models) as running:
        yield Proxy(running.url, SMOL)


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def scripted_proxy(
    tmp_path_factory: pytest.TempPathFactory, upstream: ScriptedUpstream
) -> Iterator[ProxyServer]:
    root = tmp_path_factory.mktemp("scripted")
    entries = [
        {
            "name": f"scripted_{scenario}",
            "display_name": f"scripted {scenario}",
            "backend": "external",
            "served_model_id": scenario,
            "backend_config": {"base_url": f"{upstream.url}/v1"},
        }
        for scenario in SCENARIOS
    ]
    write_json(root / "configs" / "model_registry.curated.json", entries)
    with ProxyServer(root / "configs", root, include_non_installed=True) as server:
        yield server


@pytest.fixture(scope="module")
def scripted(scripted_proxy: ProxyServer) -> Proxy:
    return Proxy(scripted_proxy.url, "scripted echo")


@pytest.fixture(params=["demo", "scripted"])
def proxy(request: pytest.FixtureRequest) -> Proxy:
    found: Proxy = request.getfixturevalue(request.param)
    return found


def post(proxy: Proxy, body: bytes | dict[str, Any]) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{proxy.url}/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json"},
        timeout=60,
    )


def openai_error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


# -- the table of issue 10: each a 400 naming the field ------------------------------------------

WRONG_FIELDS = {
    "role": ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    "content": ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    "stop": ({"stop": 5}, "stop"),
    "max_tokens": ({"max_tokens": "abc"}, "max_tokens"),
    "temperature": ({"temperature": "hot"}, "temperature"),
}


@pytest.mark.parametrize(("fields", "param"), WRONG_FIELDS.values(), ids=WRONG_FIELDS.keys())
def test_a_field_of_the_wrong_type_or_value_is_a_400_naming_it(
    proxy: Proxy, fields: dict[str, Any], param: str
) -> None:
    body = {"model": proxy.model, "messages": [{"role": "user", "content": "hi"}], **fields}
    response = post(proxy, body)
    assert response.status_code == 400
    error = openai_error(response)
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert f"'{param}': expected " in error["message"]


def test_a_body_nested_5000_deep_is_a_400(proxy: Proxy) -> None:
    nested = b"[" * 5000 + b"]" * 5000
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "x": %s}'
    response = post(proxy, body % (proxy.model.encode(), nested))
    assert response.status_code == 400
    error = openai_error(response)
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_json")
    assert "nested deeper than 64 levels" in error["message"]


def test_the_proxy_still_answers_after_the_refusals(proxy: Proxy) -> None:
    body = {"model": proxy.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    response = post(proxy, body)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["role"] == "assistant"


# -- what the backend sees --------------------------------------------------------------------


def test_unknown_fields_reach_the_backend_untouched(
    scripted: Proxy, upstream: ScriptedUpstream
) -> None:
    body: dict[str, Any] = {
        "model": "scripted echo",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi é 🐍"}], "x_part": [1]}
        ],
        "temperature": 1,
        "top_k": 40,
        "min_p": 0.05,
        "repeat_penalty": 1.1,
        "chat_template_kwargs": {"enable_thinking": False},
        "stream_options": None,
        "nested": {"deep": [{"a": None}, 2.5, "x"]},
    }
    before = len(upstream.requests)
    assert post(scripted, body).status_code == 200
    assert upstream.requests[before:] == [{**body, "model": "echo"}]


def test_a_backend_500_of_its_own_stays_a_502(scripted: Proxy) -> None:
    body = {"model": "scripted error-500", "messages": [{"role": "user", "content": "hi"}]}
    response = post(scripted, body)
    assert response.status_code == 502
    assert openai_error(response)["code"] == "upstream_error"


def test_a_backend_500_blaming_the_request_is_a_400(scripted: Proxy) -> None:
    body = {"model": "scripted error-validation", "messages": [{"role": "user", "content": "hi"}]}
    response = post(scripted, body)
    assert response.status_code == 400
    error = openai_error(response)
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        "top_k",
        "backend_rejected_request",
    )
    assert "Input should be a valid integer" in error["message"]


@pytest.fixture(scope="module")
def llama_cpp_python(
    tmp_path_factory: pytest.TempPathFactory, demo_models: Path
) -> Iterator[Proxy]:
    """The demo registry served by llama-cpp-python's server, which answers input its models
    reject with a 500 and a validation dump."""
    root = tmp_path_factory.mktemp("llama-cpp-python")
    with _demo_proxy(root, demo_models, CHAT_PROXY_LLAMACPP_LAUNCHER="llama-cpp-python") as running:
        yield Proxy(running.url, SMOL)


@pytest.mark.parametrize(("field", "value"), [("top_k", "abc"), ("min_p", "low")])
def test_an_extension_the_backend_rejects_is_a_400_naming_it(
    llama_cpp_python: Proxy, field: str, value: str
) -> None:
    # Extensions are the backend's to judge: the proxy forwards them, and llama-cpp-python's
    # 500 for them is the client's 400.
    body = {"model": SMOL, "messages": [{"role": "user", "content": "hi"}], field: value}
    response = post(llama_cpp_python, body)
    assert response.status_code == 400
    error = openai_error(response)
    assert (error["param"], error["code"]) == (field, "backend_rejected_request")
    assert "valid" in error["message"]
    assert "File " not in error["message"]


@pytest.mark.parametrize(("field", "value"), [("top_k", "abc"), ("min_p", "low")])
def test_an_extension_llama_server_rejects_is_a_400(demo: Proxy, field: str, value: str) -> None:
    body = {"model": SMOL, "messages": [{"role": "user", "content": "hi"}], field: value}
    response = post(demo, body)
    assert response.status_code == 400
    assert field in openai_error(response)["message"]
