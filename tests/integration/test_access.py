"""Who the real `imageworks-chat-proxy` serves: API and admin keys, and the browser rules (Host
names on a loopback bind, foreign origins, JSON-only admin requests, CORS), over HTTP.

Its one model runs on the scripted llama-server, so a stop has something to stop and a refused
one can be seen not to have happened."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import write_json
from support.proxy_process import RunningProxy, Workspace
from support.scripted_llama_server import write_launcher

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MODEL = "echo"
USER_KEY = "user-key-Zq7Xb2Vw"
SECOND_KEY = "second-key-Lm4Np8"
ADMIN_KEY = "admin-key-Rt5Yu9Io"
TRUSTED = "http://trusted.example:3000"
FOREIGN = "http://evil.example"
JSON = {"Content-Type": "application/json"}


def workspace(root: Path, **env: str) -> Workspace:
    weights = root / "echo.gguf"
    weights.write_bytes(b"GGUF")
    entry = {
        "name": MODEL,
        "backend": "llamacpp",
        "served_model_id": "echo",
        "download_path": str(weights),
    }
    write_json(root / "configs" / "model_registry.curated.json", [entry])
    ws = Workspace(root)
    ws.extra_env.update(
        CHAT_PROXY_LLAMA_SERVER_BINARY=str(write_launcher(root)),
        CHAT_PROXY_REQUIRE_TEMPLATE="0",
        CHAT_PROXY_INCLUDE_NON_INSTALLED="1",
        **env,
    )
    return ws


def running(ws: Workspace) -> Iterator[RunningProxy]:
    with ws.serving() as proxy:
        yield proxy


@pytest.fixture(scope="module")
def open_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    """The defaults: no keys, no listed hosts or origins, on 127.0.0.1."""
    yield from running(workspace(tmp_path_factory.mktemp("open")))


@pytest.fixture(scope="module")
def keyed_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    root = tmp_path_factory.mktemp("keyed")
    keys = root / "keys.txt"
    keys.write_text(f"# user keys, one a line\n{USER_KEY}  # the first\n\n{SECOND_KEY}\n")
    ws = workspace(
        root,
        CHAT_PROXY_API_KEYS=f"@{keys}",
        CHAT_PROXY_ADMIN_KEY=ADMIN_KEY,
        CHAT_PROXY_ALLOWED_HOSTS="chat-proxy",
        CHAT_PROXY_ALLOWED_ORIGINS=TRUSTED,
    )
    yield from running(ws)


def call(
    proxy: RunningProxy,
    method: str,
    path: str,
    *,
    key: str | None = None,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> httpx.Response:
    sent = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    return httpx.request(method, f"{proxy.url}{path}", headers=sent, timeout=60, **kwargs)


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code
    error: dict[str, Any] = body["error"]
    return error


def holder(proxy: RunningProxy, key: str | None = None) -> str | None:
    status = call(proxy, "GET", "/v1/admin/status", key=key)
    assert status.status_code == 200, status.text
    slot: dict[str, Any] = status.json()["slot"]
    return slot["holder"]


def activate(proxy: RunningProxy, key: str | None = None) -> None:
    response = call(proxy, "POST", "/v1/admin/activate", key=key, json={"model": MODEL})
    assert response.status_code == 200, response.text
    assert holder(proxy, key) == MODEL


def port_of(proxy: RunningProxy) -> int:
    return int(proxy.url.rsplit(":", 1)[1])


# -- keys ----------------------------------------------------------------------------------------


def test_missing_key_is_a_401_in_the_openai_shape(keyed_proxy: RunningProxy) -> None:
    response = call(keyed_proxy, "GET", "/v1/models")
    error = error_of(response, 401, "invalid_api_key")
    assert error["type"] == "invalid_request_error"
    assert error["param"] is None
    assert "didn't provide an API key" in error["message"]
    assert response.headers["www-authenticate"] == "Bearer"


def test_wrong_key_is_a_401_that_is_never_repeated_or_logged(keyed_proxy: RunningProxy) -> None:
    wrong = "sk-wrong-Hh3Jk5Ll7"
    response = call(keyed_proxy, "GET", "/v1/models", key=wrong)
    error = error_of(response, 401, "invalid_api_key")
    assert "Incorrect API key" in error["message"]
    assert wrong not in response.text
    assert wrong[-4:] not in response.text  # not even masked
    chat = call(keyed_proxy, "POST", "/v1/chat/completions", key=wrong, json={"model": MODEL})
    error_of(chat, 401, "invalid_api_key")
    keyed_proxy.health()  # a later request: what was logged for the others is written by now
    written = [keyed_proxy.workdir / "proxy.out", *keyed_proxy.workdir.glob("logs/**/*.jsonl*")]
    for path in written:
        text = path.read_text(errors="replace")
        for key in (wrong, USER_KEY, SECOND_KEY, ADMIN_KEY):
            assert key not in text, f"{key} in {path.name}"


def test_right_key_lists_the_models(keyed_proxy: RunningProxy) -> None:
    for key in (USER_KEY, SECOND_KEY):  # both lines of the key file, comments aside
        response = call(keyed_proxy, "GET", "/v1/models", key=key)
        assert response.status_code == 200, response.text
        assert [m["id"] for m in response.json()["data"]] == [MODEL]


def test_admin_key_also_serves_the_api(keyed_proxy: RunningProxy) -> None:
    assert call(keyed_proxy, "GET", "/v1/models", key=ADMIN_KEY).status_code == 200


def test_health_is_open_without_a_key(keyed_proxy: RunningProxy) -> None:
    response = call(keyed_proxy, "GET", "/v1/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_openapi_and_metrics_need_a_key(keyed_proxy: RunningProxy) -> None:
    for path in ("/v1/openapi.json", "/v1/metrics"):
        error_of(call(keyed_proxy, "GET", path), 401, "invalid_api_key")


def test_admin_status_refuses_a_user_key_with_a_403(keyed_proxy: RunningProxy) -> None:
    response = call(keyed_proxy, "GET", "/v1/admin/status", key=USER_KEY)
    error = error_of(response, 403, "insufficient_permissions")
    assert error["type"] == "invalid_request_error"


def test_admin_status_without_a_key_is_a_401(keyed_proxy: RunningProxy) -> None:
    error_of(call(keyed_proxy, "GET", "/v1/admin/status"), 401, "invalid_api_key")


def test_admin_status_answers_the_admin_key(keyed_proxy: RunningProxy) -> None:
    response = call(keyed_proxy, "GET", "/v1/admin/status", key=ADMIN_KEY)
    assert response.status_code == 200
    assert "slot" in response.json()


def test_user_key_cannot_stop_the_model(keyed_proxy: RunningProxy) -> None:
    activate(keyed_proxy, ADMIN_KEY)
    response = call(keyed_proxy, "POST", "/v1/admin/stop", key=USER_KEY, json={})
    error_of(response, 403, "insufficient_permissions")
    assert holder(keyed_proxy, ADMIN_KEY) == MODEL
    stopped = call(keyed_proxy, "POST", "/v1/admin/stop", key=ADMIN_KEY, json={})
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["slot"]["holder"] is None


# -- Host names ----------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}"])
def test_rebinding_host_is_refused_on_a_loopback_bind(open_proxy: RunningProxy, host: str) -> None:
    sent = host.format(port=port_of(open_proxy))
    response = call(open_proxy, "GET", "/v1/models", headers={"Host": sent})
    error = error_of(response, 403, "host_not_allowed")
    assert "CHAT_PROXY_ALLOWED_HOSTS" in error["message"]


def test_rebinding_host_cannot_stop_the_model(open_proxy: RunningProxy) -> None:
    activate(open_proxy)
    headers = {"Host": f"evil.example:{port_of(open_proxy)}", **JSON}
    response = call(open_proxy, "POST", "/v1/admin/stop", headers=headers, json={})
    error_of(response, 403, "host_not_allowed")
    assert holder(open_proxy) == MODEL


@pytest.mark.parametrize("host", ["localhost:{port}", "127.0.0.1:{port}", "[::1]:{port}"])
def test_loopback_host_names_are_served(open_proxy: RunningProxy, host: str) -> None:
    sent = host.format(port=port_of(open_proxy))
    assert call(open_proxy, "GET", "/v1/models", headers={"Host": sent}).status_code == 200


def test_a_listed_host_name_is_served(keyed_proxy: RunningProxy) -> None:
    headers = {"Host": f"chat-proxy:{port_of(keyed_proxy)}"}
    response = call(keyed_proxy, "GET", "/v1/models", key=USER_KEY, headers=headers)
    assert response.status_code == 200


def test_a_rebinding_host_is_refused_even_with_a_key(keyed_proxy: RunningProxy) -> None:
    response = call(
        keyed_proxy, "GET", "/v1/models", key=USER_KEY, headers={"Host": "evil.example"}
    )
    error_of(response, 403, "host_not_allowed")


# -- admin requests from web pages ---------------------------------------------------------------


def test_text_plain_stop_is_refused_and_nothing_stops(open_proxy: RunningProxy) -> None:
    activate(open_proxy)
    # What any web page can send without a preflight (a CORS "simple request").
    response = call(
        open_proxy, "POST", "/v1/admin/stop", headers={"Content-Type": "text/plain"}, content="{}"
    )
    error = error_of(response, 415, "unsupported_media_type")
    assert "Content-Type: application/json" in error["message"]
    assert holder(open_proxy) == MODEL


def test_foreign_origin_stop_is_refused_and_nothing_stops(open_proxy: RunningProxy) -> None:
    activate(open_proxy)
    for content_type in ("text/plain", "application/json"):
        headers = {"Origin": FOREIGN, "Content-Type": content_type}
        response = call(open_proxy, "POST", "/v1/admin/stop", headers=headers, content="{}")
        error = error_of(response, 403, "origin_not_allowed")
        assert "CHAT_PROXY_ALLOWED_ORIGINS" in error["message"]
    history = call(open_proxy, "GET", "/v1/admin/status").json()["slot"]["history"]
    assert history[-1]["event"] == "ready"  # no stop began
    assert holder(open_proxy) == MODEL


def test_null_origin_cannot_switch_the_model(open_proxy: RunningProxy) -> None:
    response = call(
        open_proxy,
        "POST",
        "/v1/admin/activate",
        headers={"Origin": "null"},
        json={"model": MODEL},
    )
    error_of(response, 403, "origin_not_allowed")


def test_foreign_origin_chat_completion_is_refused(open_proxy: RunningProxy) -> None:
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Origin": FOREIGN}
    response = call(open_proxy, "POST", "/v1/chat/completions", headers=headers, json=payload)
    error_of(response, 403, "origin_not_allowed")


def test_the_dashboards_own_origin_may_stop_the_model(open_proxy: RunningProxy) -> None:
    activate(open_proxy)
    headers = {"Origin": open_proxy.url}  # http://127.0.0.1:PORT, the Host it is sent to
    response = call(open_proxy, "POST", "/v1/admin/stop", headers=headers, json={})
    assert response.status_code == 200, response.text
    assert holder(open_proxy) is None


def test_the_loader_can_still_stop_the_model(open_proxy: RunningProxy) -> None:
    activate(open_proxy)
    ws = Workspace(open_proxy.workdir, proxy_port=port_of(open_proxy))
    result = ws.loader("activate-model", "--stop")  # a POST of {} as JSON
    assert result.returncode == 0, result.stderr
    assert "No model is active" in result.stdout
    assert holder(open_proxy) is None


# -- CORS ----------------------------------------------------------------------------------------


def test_cors_is_off_by_default(open_proxy: RunningProxy) -> None:
    response = call(open_proxy, "GET", "/v1/models", headers={"Origin": TRUSTED})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
    preflight = call(
        open_proxy,
        "OPTIONS",
        "/v1/chat/completions",
        headers={"Origin": TRUSTED, "Access-Control-Request-Method": "POST"},
    )
    error_of(preflight, 403, "origin_not_allowed")
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_headers_only_for_an_allowed_origin(keyed_proxy: RunningProxy) -> None:
    listed = call(keyed_proxy, "GET", "/v1/models", key=USER_KEY, headers={"Origin": TRUSTED})
    assert listed.status_code == 200
    assert listed.headers["access-control-allow-origin"] == TRUSTED
    assert "Origin" in listed.headers["vary"]
    other = call(keyed_proxy, "GET", "/v1/models", key=USER_KEY, headers={"Origin": FOREIGN})
    assert other.status_code == 200
    assert "access-control-allow-origin" not in other.headers


def test_preflight_is_answered_for_an_allowed_origin(keyed_proxy: RunningProxy) -> None:
    headers = {
        "Origin": TRUSTED,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    response = call(keyed_proxy, "OPTIONS", "/v1/chat/completions", headers=headers)
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == TRUSTED
    assert "POST" in response.headers["access-control-allow-methods"]
    allowed = response.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed
    assert "content-type" in allowed


def test_preflight_is_refused_for_another_origin(keyed_proxy: RunningProxy) -> None:
    headers = {"Origin": FOREIGN, "Access-Control-Request-Method": "POST"}
    response = call(keyed_proxy, "OPTIONS", "/v1/admin/stop", headers=headers)
    error_of(response, 403, "origin_not_allowed")
    assert "access-control-allow-origin" not in response.headers


def test_an_allowed_origin_reaches_the_api(keyed_proxy: RunningProxy) -> None:
    payload = {"model": "no such model", "messages": [{"role": "user", "content": "hi"}]}
    response = call(
        keyed_proxy,
        "POST",
        "/v1/chat/completions",
        key=USER_KEY,
        headers={"Origin": TRUSTED},
        json=payload,
    )
    error_of(response, 404, "model_not_found")  # the proxy's own answer, past the guard
    assert response.headers["access-control-allow-origin"] == TRUSTED


def test_a_foreign_origin_is_refused_even_with_a_key(keyed_proxy: RunningProxy) -> None:
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    response = call(
        keyed_proxy,
        "POST",
        "/v1/chat/completions",
        key=USER_KEY,
        headers={"Origin": FOREIGN},
        json=payload,
    )
    error_of(response, 403, "origin_not_allowed")
    assert json.loads(response.text)["error"]["param"] is None


def test_the_loader_uses_the_admin_key_on_a_keyed_proxy_and_says_which_to_set(
    keyed_proxy: RunningProxy,
) -> None:
    ws = Workspace(keyed_proxy.workdir, proxy_port=port_of(keyed_proxy))
    ws.extra_env["CHAT_PROXY_ADMIN_KEY"] = ADMIN_KEY
    started = ws.loader("activate-model", MODEL, "--json")
    assert started.returncode == 0, started.stderr
    assert holder(keyed_proxy, ADMIN_KEY) is not None
    current = ws.loader("current-model")
    assert current.returncode == 0, current.stderr
    assert "is active on port" in current.stdout
    ws.extra_env["CHAT_PROXY_ADMIN_KEY"] = ""  # nothing: the proxy refuses the loader
    refused = ws.loader("activate-model", "--stop")
    assert refused.returncode == 1
    [line] = refused.stderr.splitlines()
    assert "CHAT_PROXY_ADMIN_KEY" in line
    assert ADMIN_KEY not in refused.stderr + refused.stdout
    assert holder(keyed_proxy, ADMIN_KEY) is not None  # not stopped
    ws.extra_env["CHAT_PROXY_ADMIN_KEY"] = ADMIN_KEY
    assert ws.loader("activate-model", "--stop").returncode == 0
    assert holder(keyed_proxy, ADMIN_KEY) is None
