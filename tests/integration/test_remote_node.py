"""Two nodes: node A (the proxy under test) serves an `external` entry pointing at node B, a
second proxy on another loopback port that requires a key and serves the demo SmolLM2 on the
real llama-server. The key reaches B, never A's logs or listings; B going down is seen by A's
health check, and B coming back brings the entry back.

The tests run in file order and share the two nodes; the last one stops and restarts B."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import make_demo_workspace, write_json
from support.proxy_process import RunningProxy, Workspace

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SMOL = "smollm2 135m (Q4 1)"  # node B's id for the demo SmolLM2
SMOL_ENTRY = "smollm2_135m_(Q4_1)"
REMOTE = "node_b_smol"  # node A's entries
WRONG = "node_b_wrong_key"
MISSING = "node_b_missing_key"
CHECK_INTERVAL_S = 0.5


@dataclass
class Nodes:
    a: RunningProxy
    b: RunningProxy
    ws_a: Workspace
    ws_b: Workspace
    key: str
    wrong_key: str


def remote_entry(name: str, port: int, variable: str) -> dict[str, Any]:
    return {
        "name": name,
        "backend": "external",
        "served_model_id": SMOL,
        "backend_config": {
            "base_url": f"http://127.0.0.1:{port}/v1",
            "api_key_env": variable,
            "request_timeout_s": 120,
            "stream_idle_timeout_s": 60,
            "connect_timeout_s": 5,
            "health_check_interval_s": CHECK_INTERVAL_S,
        },
    }


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory, demo_models: Path) -> Iterator[Nodes]:
    key, wrong_key = f"sk-b-{secrets.token_hex(16)}", f"sk-x-{secrets.token_hex(16)}"
    root_b = tmp_path_factory.mktemp("node_b")
    make_demo_workspace(root_b, demo_models)
    ws_b = Workspace(root_b, extra_env={"CHAT_PROXY_API_KEYS": key})
    root_a = tmp_path_factory.mktemp("node_a")
    port_b = ws_b.proxy_port
    entries = [
        remote_entry(REMOTE, port_b, "NODE_B_KEY"),
        remote_entry(WRONG, port_b, "NODE_B_WRONG_KEY"),
        remote_entry(MISSING, port_b, "NODE_B_UNSET_KEY"),
    ]
    write_json(root_a / "configs" / "model_registry.curated.json", entries)
    ws_a = Workspace(root_a, extra_env={"NODE_B_KEY": key, "NODE_B_WRONG_KEY": wrong_key})
    with ws_b.serving() as b, ws_a.serving() as a:
        nodes = Nodes(a, b, ws_a, ws_b, key, wrong_key)
        yield nodes
        # The last test restarted B: that one is the one to stop.
        if nodes.b is not b and nodes.b.process.poll() is None:
            nodes.b.terminate()
            ws_b.kill_model_servers()


def chat(proxy: RunningProxy, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hi."}], **extra}
    return httpx.post(
        f"{proxy.url}/v1/chat/completions", json={"max_tokens": 8, **body}, timeout=180
    )


def overview_models(a: RunningProxy) -> dict[str, dict[str, Any]]:
    models = httpx.get(f"{a.url}/v1/admin/overview", timeout=10).json()["models"]
    return {model["name"]: model for model in models}


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def b_log(nodes: Nodes) -> list[dict[str, Any]]:
    path = nodes.ws_b.root / "logs" / "chat_proxy.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def assert_keys_nowhere_on_a(nodes: Nodes) -> None:
    a, keys = nodes.a, (nodes.key, nodes.wrong_key)
    a.health()  # a later request: the request log has written what came before
    shown = {
        path: httpx.get(f"{a.url}{path}", timeout=10).text
        for path in ("/v1/models", "/v1/admin/overview", "/v1/admin/status")
    }
    for name in (REMOTE, WRONG, MISSING):
        shown[f"loader show {name}"] = nodes.ws_a.loader("show", name, "--json").stdout
    shown["loader list"] = nodes.ws_a.loader("list", "--json").stdout
    for path in [nodes.ws_a.root / "proxy.out", *(nodes.ws_a.root / "logs").rglob("*")]:
        if path.is_file():
            shown[str(path)] = path.read_text(errors="replace")
    assert "NODE_B_KEY" in shown[f"loader show {REMOTE}"]  # the variable's name is what shows
    for where, text in shown.items():
        for key in keys:
            assert key not in text, f"a key in {where}"


def test_chat_through_node_a_reaches_node_b_with_its_key(nodes: Nodes) -> None:
    wait_for(lambda: overview_models(nodes.a)[REMOTE]["installed"], "A sees B's model")
    answer = chat(nodes.a, REMOTE)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] in ("stop", "length")

    with httpx.stream(
        "POST",
        f"{nodes.a.url}/v1/chat/completions",
        json={
            "model": REMOTE,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 8,
            "stream": True,
        },
        timeout=180,
    ) as streamed:
        assert streamed.status_code == 200
        lines = [line for line in streamed.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert any(choice.get("finish_reason") for chunk in chunks for choice in chunk["choices"])

    # B accepted the key: both requests are in its request log, answered.
    wait_for(lambda: len(b_log(nodes)) >= 2, "B's request log has both requests", 10)
    records = [r for r in b_log(nodes) if r["model_resolved"] == SMOL_ENTRY]
    assert sorted(r["stream"] for r in records) == [False, True]
    assert {r["outcome"] for r in records} == {"ok"}
    # Without a key B refuses, so it was the key that let them in.
    refused = httpx.post(f"{nodes.b.url}/v1/chat/completions", json={"model": SMOL}, timeout=10)
    assert refused.status_code == 401


def test_a_missing_variable_is_a_503_naming_it_and_the_entry(nodes: Nodes) -> None:
    error = error_of(chat(nodes.a, MISSING), 503)
    assert "NODE_B_UNSET_KEY" in error["message"]
    assert MISSING in error["message"]
    wait_for(lambda: overview_models(nodes.a)[MISSING]["unreachable"] is not None, "marked")
    reason = overview_models(nodes.a)[MISSING]["unreachable"]["reason"]
    assert "NODE_B_UNSET_KEY" in reason
    assert "not set" in reason


def test_a_wrong_key_is_a_clear_error_naming_its_variable(nodes: Nodes) -> None:
    wait_for(lambda: overview_models(nodes.a)[WRONG]["unreachable"] is not None, "marked")
    reason = overview_models(nodes.a)[WRONG]["unreachable"]["reason"]
    assert "NODE_B_WRONG_KEY" in reason
    assert "401" in reason
    error = error_of(chat(nodes.a, WRONG), 503)
    assert error["code"] == "backend_unreachable"
    assert "NODE_B_WRONG_KEY" in error["message"]
    assert "refused the key" in error["message"]
    assert_keys_nowhere_on_a(nodes)


def test_node_b_down_is_seen_by_node_a_and_its_return_too(nodes: Nodes) -> None:
    nodes.b.terminate()
    nodes.ws_b.kill_model_servers()
    wait_for(
        lambda: overview_models(nodes.a)[REMOTE]["state"] == "unreachable",
        "A marks B's entry unreachable",
        timeout_s=30,
    )
    refused = chat(nodes.a, REMOTE)
    error = error_of(refused, 503)
    assert error["code"] == "backend_unreachable"
    assert f"127.0.0.1:{nodes.ws_b.proxy_port}/v1" in error["message"]
    assert "unreachable since" in error["message"]
    assert int(refused.headers["Retry-After"]) >= 1
    listed = httpx.get(f"{nodes.a.url}/v1/models", timeout=10).json()["data"]
    states = {item["extensions"]["logical_id"]: item["extensions"]["installed"] for item in listed}
    assert states[REMOTE] == "unreachable"  # still listed: clients keep their selection

    nodes.b = nodes.ws_b.start_proxy()
    wait_for(
        lambda: overview_models(nodes.a)[REMOTE]["unreachable"] is None,
        "A sees B back",
        timeout_s=30,
    )
    back = chat(nodes.a, REMOTE)
    assert back.status_code == 200, back.text
    assert back.json()["choices"][0]["message"]["role"] == "assistant"
    assert_keys_nowhere_on_a(nodes)
