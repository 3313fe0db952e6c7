"""The access guard: its rules as pure functions, the policy's decisions, and the ASGI layer."""

from __future__ import annotations

import asyncio
import hmac
import json
import os
from pathlib import Path
from typing import Any

import pytest

from imageworks.chat_proxy import guard
from imageworks.chat_proxy.config import ProxySettings, SettingsError, load_settings
from imageworks.chat_proxy.guard import (
    AccessGuard,
    AccessPolicy,
    Answer,
    KeyRing,
    Role,
    admin_body_allowed,
    bearer_token,
    binds_loopback,
    first_headers,
    host_allowed,
    hostname,
    is_json,
    is_loopback,
    origin_allowed,
    startup_warnings,
)

pytestmark = pytest.mark.timeout(10)

USER = "user-key-0123456789"
ADMIN = "admin-key-9876543210"
TRUSTED = "http://trusted.example:3000"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CHAT_PROXY_"):
            monkeypatch.delenv(name)


def decide(
    method: str, path: str, *, settings: ProxySettings | None = None, **headers: str
) -> Answer | guard.Headers:
    """The policy's verdict; header names as keywords (`content_type` is Content-Type)."""
    raw = {name.replace("_", "-").encode(): value.encode() for name, value in headers.items()}
    return AccessPolicy(settings or ProxySettings()).decide(method, path, raw)


def refusal(verdict: Answer | guard.Headers) -> tuple[int, dict[str, Any]]:
    assert isinstance(verdict, Answer), verdict
    return verdict.status, json.loads(verdict.body)["error"]


def header(verdict: Answer | guard.Headers, name: bytes) -> bytes | None:
    headers = verdict.headers if isinstance(verdict, Answer) else verdict
    return dict(headers).get(name)


def keyed(**extra: Any) -> ProxySettings:
    return ProxySettings(api_keys=frozenset({USER, "another-user-key"}), admin_key=ADMIN, **extra)


# -- Host names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header_value", "name"),
    [
        ("localhost", "localhost"),
        ("localhost:8100", "localhost"),
        ("LocalHost:8100", "localhost"),
        ("127.0.0.1:8100", "127.0.0.1"),
        ("[::1]:8100", "::1"),
        ("[::1]", "::1"),
        ("example.com.", "example.com"),
        ("chat-proxy:", "chat-proxy"),
        (" chat-proxy ", "chat-proxy"),
    ],
)
def test_hostname_strips_port_brackets_and_trailing_dot(header_value: str, name: str) -> None:
    assert hostname(header_value) == name


@pytest.mark.parametrize("header_value", ["", ":8100", "::1", "[::1", "[::1]8100", "a:b", "h:8²"])
def test_hostname_of_a_malformed_host_header_is_none(header_value: str) -> None:
    assert hostname(header_value) is None


@pytest.mark.parametrize(
    "name", ["localhost", "app.localhost", "127.0.0.1", "127.9.8.7", "::1", "::ffff:127.0.0.1"]
)
def test_is_loopback_accepts_loopback_names_and_addresses(name: str) -> None:
    assert is_loopback(name)


@pytest.mark.parametrize(
    "name",
    ["evil.example", "localhost.evil.example", "127.0.0.1.nip.io", "0.0.0.0", "10.0.0.1", "::"],
)
def test_is_loopback_refuses_other_names(name: str) -> None:
    assert not is_loopback(name)


@pytest.mark.parametrize(
    ("bind", "loopback"),
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.5", False),
        ("", False),
    ],
)
def test_binds_loopback(bind: str, loopback: bool) -> None:
    assert binds_loopback(bind) is loopback


@pytest.mark.parametrize(
    "host", ["localhost:8100", "127.0.0.1:8100", "[::1]:8100", "127.0.0.1", "ui.localhost:8100"]
)
def test_host_allowed_serves_loopback_names_on_a_loopback_bind(host: str) -> None:
    assert host_allowed(host, "127.0.0.1", frozenset())


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8100", "192.168.1.5:8100", "::1"])
def test_host_allowed_refuses_other_names_on_a_loopback_bind(host: str) -> None:
    assert not host_allowed(host, "127.0.0.1", frozenset())


def test_host_allowed_serves_listed_names_with_or_without_a_port() -> None:
    assert host_allowed("chat-proxy:8100", "127.0.0.1", frozenset({"chat-proxy"}))
    assert host_allowed("CHAT-PROXY", "localhost", frozenset({"chat-proxy:8100"}))
    assert host_allowed("anything.example", "127.0.0.1", frozenset({"*"}))


def test_host_allowed_without_a_host_header_http_1_0() -> None:
    assert host_allowed(None, "127.0.0.1", frozenset())


def test_host_allowed_does_not_check_beyond_a_loopback_bind_with_no_names_listed() -> None:
    assert host_allowed("evil.example", "0.0.0.0", frozenset())


def test_host_allowed_checks_any_bind_whose_names_are_listed() -> None:
    # The compose files: 0.0.0.0 in the container, published on the host's 127.0.0.1.
    names = frozenset({"chat-proxy"})
    assert not host_allowed("evil.example", "0.0.0.0", names)
    assert host_allowed("chat-proxy:8100", "0.0.0.0", names)
    assert host_allowed("127.0.0.1:8100", "0.0.0.0", names)
    assert host_allowed("evil.example", "0.0.0.0", frozenset({"*"}))


# -- Origins and content types -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        (None, "localhost:8100"),  # not a browser
        ("http://localhost:8100", "localhost:8100"),  # the dashboard, same origin
        ("https://proxy.lan", "proxy.lan"),  # the dashboard behind a TLS proxy
        ("HTTP://LocalHost:8100", "localhost:8100"),
        (TRUSTED, "localhost:8100"),
        ("HTTP://TRUSTED.EXAMPLE:3000", "localhost:8100"),
    ],
)
def test_origin_allowed(origin: str | None, host: str) -> None:
    assert origin_allowed(origin, host, frozenset({TRUSTED}))


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        ("http://evil.example", "localhost:8100"),
        ("null", "localhost:8100"),  # a sandboxed or opaque page
        ("http://localhost:8101", "localhost:8100"),  # another local port is another origin
        ("http://trusted.example", "localhost:8100"),  # the listed one has a port
        ("http://localhost:8100", None),
    ],
)
def test_origin_refused(origin: str, host: str | None) -> None:
    assert not origin_allowed(origin, host, frozenset({TRUSTED}))


def test_origin_star_allows_every_origin() -> None:
    assert origin_allowed("http://evil.example", "localhost", frozenset({"*"}))


@pytest.mark.parametrize(
    ("value", "json_"),
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("Application/JSON ;charset=UTF-8", True),
        ("text/plain", False),
        ("text/plain; application/json", False),
        ("application/x-www-form-urlencoded", False),
        ("multipart/form-data; boundary=x", False),
        ("application/json-patch+json", False),
        ("", False),
    ],
)
def test_is_json(value: str, json_: bool) -> None:
    assert is_json(value) is json_


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ({b"content-type": b"application/json", b"content-length": b"2"}, True),
        ({b"content-type": b"text/plain", b"content-length": b"2"}, False),
        ({}, True),  # `curl -X POST`, `httpx.post(url)`: no body, no Origin
        ({b"content-length": b"0"}, True),
        ({b"origin": b"http://localhost:8100"}, False),  # every browser POST has an Origin
        ({b"content-length": b"5"}, False),
        ({b"transfer-encoding": b"chunked"}, False),
    ],
)
def test_admin_body_allowed(headers: dict[bytes, bytes], allowed: bool) -> None:
    assert admin_body_allowed(headers) is allowed


# -- keys ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "token"),
    [
        (b"Bearer abc", b"abc"),
        (b"bearer   abc  ", b"abc"),
        (b"BEARER abc", b"abc"),
        (b"Basic YWJjOg==", None),
        (b"Bearer", None),
        (b"Bearer   ", None),
        (None, None),
    ],
)
def test_bearer_token(value: bytes | None, token: bytes | None) -> None:
    assert bearer_token(value) == token


def test_key_ring_roles() -> None:
    keys = KeyRing({USER}, ADMIN)
    assert keys.role(None) is Role.NONE
    assert keys.role(USER.encode()) is Role.USER
    assert keys.role(ADMIN.encode()) is Role.ADMIN
    assert keys.role(b"wrong") is Role.UNKNOWN
    assert keys.role(USER.encode() + b"x") is Role.UNKNOWN
    assert keys.role(USER.encode()[:-1]) is Role.UNKNOWN


def test_key_ring_compares_every_key_as_equal_length_digests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compared: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(guard.hmac, "compare_digest", counting)
    keys = KeyRing(["k1", "k2-longer", "k3"], "admin")
    for token in (b"k1", b"k3", b"no", b"admin", b"x" * 500):
        compared.clear()
        keys.role(token)
        # Whichever key matches (or none), all four are compared, each as 32 against 32 bytes.
        assert compared == [(32, 32)] * 4


def test_api_keys_from_a_file_with_comments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keys.txt"
    path.write_text("# the team's keys\nalpha  # Alice\n\n  beta,gamma\n#delta\n")
    monkeypatch.setenv("CHAT_PROXY_API_KEYS", f"@{path}")
    assert load_settings().api_keys == {"alpha", "beta", "gamma"}


def test_api_keys_from_a_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHAT_PROXY_API_KEYS", " alpha, beta ,,")
    assert load_settings().api_keys == {"alpha", "beta"}


def test_api_keys_file_that_cannot_be_read_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHAT_PROXY_API_KEYS", f"@{tmp_path / 'missing.txt'}")
    with pytest.raises(SettingsError, match="CHAT_PROXY_API_KEYS"):
        load_settings()


def test_admin_key_loses_surrounding_whitespace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHAT_PROXY_ADMIN_KEY", f" {ADMIN}\n")
    assert load_settings().admin_key == ADMIN


def test_keys_are_not_in_the_settings_repr() -> None:
    assert USER not in repr(keyed())
    assert ADMIN not in repr(keyed())


# -- the policy: Host ----------------------------------------------------------------------------


def test_policy_refuses_a_rebinding_host_on_a_loopback_bind() -> None:
    status, error = refusal(decide("GET", "/v1/models", host="evil.example:8100"))
    assert status == 403
    assert error["code"] == "host_not_allowed"
    assert error["type"] == "invalid_request_error"
    assert "CHAT_PROXY_ALLOWED_HOSTS" in error["message"]


def test_policy_refuses_the_host_before_anything_else() -> None:
    verdict = decide("GET", "/v1/health", settings=keyed(), host="evil.example")
    assert refusal(verdict)[1]["code"] == "host_not_allowed"


def test_policy_host_verdicts_stay_right_past_the_remembered_ones() -> None:
    policy = AccessPolicy(ProxySettings())
    for round_ in range(2):  # the second round meets remembered verdicts, then fresh ones
        for n in range(100):
            refused = policy.decide("GET", "/v1/models", {b"host": f"evil{n}.example".encode()})
            assert refusal(refused)[0] == 403, (round_, n)
            assert policy.decide("GET", "/v1/models", {b"host": f"127.0.0.{n}".encode()}) == ()


def test_policy_serves_any_host_on_a_wildcard_bind() -> None:
    verdict = decide("GET", "/v1/models", settings=ProxySettings(host="0.0.0.0"), host="x.lan")
    assert verdict == ()


# -- the policy: CORS ----------------------------------------------------------------------------


def test_policy_answers_a_preflight_from_a_listed_origin() -> None:
    verdict = decide(
        "OPTIONS",
        "/v1/chat/completions",
        settings=ProxySettings(allowed_origins=frozenset({TRUSTED})),
        host="localhost:8100",
        origin=TRUSTED,
        access_control_request_method="POST",
        access_control_request_headers="authorization, content-type, x-stainless-os",
    )
    assert isinstance(verdict, Answer)
    assert verdict.status == 204
    assert header(verdict, b"access-control-allow-origin") == TRUSTED.encode()
    assert header(verdict, b"access-control-allow-methods") == b"GET, POST, OPTIONS"
    allowed = header(verdict, b"access-control-allow-headers") or b""
    assert b"authorization" in allowed
    assert b"content-type" in allowed
    assert b"x-stainless-os" in allowed
    assert header(verdict, b"access-control-allow-private-network") is None


def test_policy_preflight_allows_private_network_access_for_a_listed_origin() -> None:
    verdict = decide(
        "OPTIONS",
        "/v1/models",
        settings=ProxySettings(allowed_origins=frozenset({TRUSTED})),
        origin=TRUSTED,
        access_control_request_method="GET",
        access_control_request_private_network="true",
    )
    assert header(verdict, b"access-control-allow-private-network") == b"true"


def test_policy_preflight_falls_back_to_the_usual_headers_for_a_strange_request() -> None:
    verdict = decide(
        "OPTIONS",
        "/v1/models",
        settings=ProxySettings(allowed_origins=frozenset({TRUSTED})),
        origin=TRUSTED,
        access_control_request_method="GET",
        access_control_request_headers="x-a\r\nset-cookie: 1",
    )
    assert header(verdict, b"access-control-allow-headers") == b"Authorization, Content-Type"


@pytest.mark.parametrize("listed", [frozenset(), frozenset({TRUSTED})])
def test_policy_refuses_a_preflight_from_another_origin_without_cors_headers(
    listed: frozenset[str],
) -> None:
    verdict = decide(
        "OPTIONS",
        "/v1/admin/stop",
        settings=ProxySettings(allowed_origins=listed),
        origin="http://evil.example",
        access_control_request_method="POST",
    )
    status, error = refusal(verdict)
    assert status == 403
    assert error["code"] == "origin_not_allowed"
    assert header(verdict, b"access-control-allow-origin") is None


def test_policy_adds_cors_headers_for_a_listed_origin_only() -> None:
    settings = ProxySettings(allowed_origins=frozenset({TRUSTED}))
    listed = decide("GET", "/v1/models", settings=settings, origin=TRUSTED)
    assert header(listed, b"access-control-allow-origin") == TRUSTED.encode()
    assert header(listed, b"vary") == b"Origin"
    other = decide("GET", "/v1/models", settings=settings, origin="http://evil.example")
    assert header(other, b"access-control-allow-origin") is None
    assert header(other, b"vary") == b"Origin"


def test_policy_without_allowed_origins_never_adds_cors_headers() -> None:
    assert decide("GET", "/v1/models", origin=TRUSTED) == ()


# -- the policy: Origin and Content-Type ---------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/admin/stop", "/v1/admin/activate", "/v1/chat/completions"])
def test_policy_refuses_a_foreign_origin_that_would_change_something(path: str) -> None:
    verdict = decide(
        "POST",
        path,
        host="localhost:8100",
        origin="http://evil.example",
        content_type="application/json",
        content_length="2",
    )
    status, error = refusal(verdict)
    assert status == 403
    assert error["code"] == "origin_not_allowed"
    assert "CHAT_PROXY_ALLOWED_ORIGINS" in error["message"]
    assert header(verdict, b"connection") == b"close"  # its body is never read


def test_policy_lets_a_foreign_origin_read() -> None:
    # The browser keeps the answer from the page: there are no CORS headers.
    assert decide("GET", "/v1/admin/status", origin="http://evil.example") == ()


def test_policy_serves_the_dashboard_its_own_origin() -> None:
    verdict = decide(
        "POST",
        "/v1/admin/stop",
        host="localhost:8100",
        origin="http://localhost:8100",
        content_type="application/json",
    )
    assert verdict == ()


def test_policy_refuses_a_text_plain_admin_post() -> None:
    verdict = decide("POST", "/v1/admin/stop", host="localhost:8100", content_type="text/plain")
    status, error = refusal(verdict)
    assert status == 415
    assert error["code"] == "unsupported_media_type"
    assert "Content-Type: application/json" in error["message"]


def test_policy_does_not_ask_chat_completions_for_a_content_type() -> None:
    # `curl -d` sends application/x-www-form-urlencoded; no browser page gets this far.
    form = "application/x-www-form-urlencoded"
    assert decide("POST", "/v1/chat/completions", content_type=form) == ()


# -- the policy: keys ----------------------------------------------------------------------------


def test_policy_without_keys_serves_everything() -> None:
    assert decide("GET", "/v1/models") == ()
    assert decide("POST", "/v1/admin/stop", content_type="application/json") == ()


def test_policy_refuses_a_missing_key_with_a_401() -> None:
    verdict = decide("GET", "/v1/models", settings=keyed())
    status, error = refusal(verdict)
    assert status == 401
    assert error == {
        "message": error["message"],
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
    assert "didn't provide an API key" in error["message"]
    assert header(verdict, b"www-authenticate") == b"Bearer"
    assert header(verdict, b"connection") is None  # a GET has no body to skip


def test_policy_refuses_a_wrong_key_without_quoting_it() -> None:
    wrong = "sk-wrong-key-that-must-not-be-echoed"
    verdict = decide("GET", "/v1/models", settings=keyed(), authorization=f"Bearer {wrong}")
    status, error = refusal(verdict)
    assert status == 401
    assert error["code"] == "invalid_api_key"
    assert "Incorrect API key" in error["message"]
    assert isinstance(verdict, Answer)
    assert wrong.encode() not in verdict.body
    assert wrong[-4:].encode() not in verdict.body  # not even masked


def test_policy_accepts_user_and_admin_keys_on_the_api() -> None:
    for key in (USER, "another-user-key", ADMIN):
        assert decide("GET", "/v1/models", settings=keyed(), authorization=f"Bearer {key}") == ()


@pytest.mark.parametrize("path", ["/v1/health", "/ui", "/ui/", "/ui/app.js"])
def test_policy_open_paths_need_no_key(path: str) -> None:
    assert decide("GET", path, settings=keyed()) == ()


@pytest.mark.parametrize("path", ["/v1/metrics", "/v1/openapi.json", "/v1/models/x", "/uix", "/"])
def test_policy_other_paths_need_a_key(path: str) -> None:
    assert refusal(decide("GET", path, settings=keyed()))[0] == 401


def test_policy_admin_endpoints_refuse_a_user_key_with_a_403() -> None:
    verdict = decide("GET", "/v1/admin/status", settings=keyed(), authorization=f"Bearer {USER}")
    status, error = refusal(verdict)
    assert status == 403
    assert error["code"] == "insufficient_permissions"
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("authorization", [None, "Bearer wrong"])
def test_policy_admin_endpoints_refuse_no_key_or_a_wrong_one_with_a_401(
    authorization: str | None,
) -> None:
    headers = {"authorization": authorization} if authorization else {}
    status, error = refusal(decide("GET", "/v1/admin/status", settings=keyed(), **headers))
    assert status == 401
    assert "admin key" in error["message"]


def test_policy_admin_endpoints_accept_the_admin_key() -> None:
    verdict = decide("GET", "/v1/admin/status", settings=keyed(), authorization=f"Bearer {ADMIN}")
    assert verdict == ()


def test_policy_without_an_admin_key_admin_endpoints_take_any_user_key() -> None:
    settings = ProxySettings(api_keys=frozenset({USER}))
    verdict = decide("GET", "/v1/admin/status", settings=settings, authorization=f"Bearer {USER}")
    assert verdict == ()


def test_policy_with_only_an_admin_key_guards_only_admin_endpoints() -> None:
    settings = ProxySettings(admin_key=ADMIN)
    assert decide("GET", "/v1/models", settings=settings, authorization="Bearer EMPTY") == ()
    assert refusal(decide("GET", "/v1/admin/status", settings=settings))[0] == 401
    verdict = decide("GET", "/v1/admin/status", settings=settings, authorization=f"Bearer {ADMIN}")
    assert verdict == ()


def test_policy_key_refusals_for_a_listed_origin_carry_cors_headers() -> None:
    # So the trusted page can read why it was refused.
    settings = keyed(allowed_origins=frozenset({TRUSTED}))
    verdict = decide("GET", "/v1/models", settings=settings, origin=TRUSTED)
    assert refusal(verdict)[0] == 401
    assert header(verdict, b"access-control-allow-origin") == TRUSTED.encode()


def test_policy_checks_the_content_type_before_the_key() -> None:
    verdict = decide("POST", "/v1/admin/stop", settings=keyed(), content_type="text/plain")
    assert refusal(verdict)[0] == 415


# -- start-up warnings ---------------------------------------------------------------------------


def test_startup_warnings_none_on_loopback() -> None:
    assert startup_warnings(ProxySettings()) == []


def test_startup_warnings_beyond_loopback_without_keys_name_the_variable() -> None:
    (warning,) = startup_warnings(ProxySettings(host="0.0.0.0"))
    assert "CHAT_PROXY_API_KEYS" in warning
    assert "admin" in warning


def test_startup_warnings_beyond_loopback_without_an_admin_key() -> None:
    (warning,) = startup_warnings(ProxySettings(host="0.0.0.0", api_keys=frozenset({USER})))
    assert "CHAT_PROXY_ADMIN_KEY" in warning
    assert USER not in warning


def test_startup_warnings_beyond_loopback_with_both_keys() -> None:
    assert startup_warnings(keyed(host="192.168.1.5")) == []


def test_startup_warnings_for_a_wildcard_origin() -> None:
    (warning,) = startup_warnings(ProxySettings(allowed_origins=frozenset({"*"})))
    assert "CHAT_PROXY_ALLOWED_ORIGINS" in warning


# -- the ASGI layer ------------------------------------------------------------------------------


class Exchange:
    """One request through an AccessGuard around `app`, recording what reaches the client."""

    def __init__(self, app: Any, settings: ProxySettings | None = None) -> None:
        self.guard = AccessGuard(app, settings or ProxySettings())
        self.sent: list[dict[str, Any]] = []

    async def run(self, scope: dict[str, Any], incoming: list[dict[str, Any]]) -> None:
        async def receive() -> dict[str, Any]:
            return incoming.pop(0) if incoming else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            self.sent.append(message)

        await self.guard(scope, receive, send)


def http_scope(method: str, path: str, *headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "headers": list(headers)}


async def test_guard_passes_a_stream_through_chunk_by_chunk() -> None:
    first_chunk_seen = asyncio.Event()

    async def streaming_app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"one", "more_body": True})
        await first_chunk_seen.wait()  # a guard that buffered would never let this happen
        await send({"type": "http.response.body", "body": b"two"})

    exchange = Exchange(streaming_app)

    async def watch() -> None:
        while not any(m.get("body") == b"one" for m in exchange.sent):
            await asyncio.sleep(0.001)
        first_chunk_seen.set()

    await asyncio.gather(exchange.run(http_scope("GET", "/v1/models"), []), watch())
    assert [m.get("body") for m in exchange.sent] == [None, b"one", b"two"]


async def test_guard_adds_cors_headers_to_the_apps_answer() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-app", b"1")]})
        await send({"type": "http.response.body", "body": b"{}"})

    exchange = Exchange(app, ProxySettings(allowed_origins=frozenset({TRUSTED})))
    await exchange.run(http_scope("GET", "/v1/models", (b"origin", TRUSTED.encode())), [])
    headers = dict(exchange.sent[0]["headers"])
    assert headers[b"x-app"] == b"1"
    assert headers[b"access-control-allow-origin"] == TRUSTED.encode()


async def test_guard_answers_a_refusal_without_calling_the_app() -> None:
    called = False

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal called
        called = True

    exchange = Exchange(app)
    scope = http_scope("POST", "/v1/admin/stop", (b"content-type", b"text/plain"))
    await exchange.run(scope, [{"type": "http.request", "body": b"x"}])
    assert not called
    assert exchange.sent[0]["status"] == 415
    assert json.loads(exchange.sent[1]["body"])["error"]["code"] == "unsupported_media_type"


async def test_guard_passes_lifespan_through() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    await Exchange(app).run({"type": "lifespan"}, [])
    assert seen == ["lifespan"]


async def test_guard_closes_a_websocket_from_a_foreign_origin() -> None:
    called = False

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal called
        called = True

    exchange = Exchange(app)
    scope = {
        "type": "websocket",
        "path": "/ui/live",
        "headers": [(b"host", b"localhost:8100"), (b"origin", b"http://evil.example")],
    }
    await exchange.run(scope, [{"type": "websocket.connect"}])
    assert not called
    assert exchange.sent == [{"type": "websocket.close", "code": 1008}]


def test_first_headers_keeps_the_first_of_each_and_only_those_read() -> None:
    raw = [(b"host", b"a"), (b"host", b"b"), (b"cookie", b"c"), (b"origin", b"o")]
    assert first_headers(raw) == {b"host": b"a", b"origin": b"o"}
