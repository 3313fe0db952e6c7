"""Generated requests thrown at the real proxy: never a 5xx, never a hang, every error in
OpenAI's shape.

Valid chat requests are drawn from the request schema the proxy itself serves in
`/v1/openapi.json`, so they also test that document: a request it allows is never refused as
malformed. Mutations of them (wrong types, missing fields, huge numbers, deep nesting, odd
unicode, broken or non-JSON bytes) must be refused cleanly. The backends are the scripted
upstream (answers any request) and the fake Ollama (Ollama's native API), so a request that
gets through gets an answer. Deterministic: `derandomize=True`, no example database.
"""

from __future__ import annotations

import json
import math
import urllib.parse
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import write_json
from support.fake_ollama import FakeOllama
from support.proxy_server import ProxyServer
from support.scripted_upstream import ScriptedUpstream

pytestmark = pytest.mark.timeout(180)

REQUEST_TIMEOUT_S = 15  # a hang fails the example instead of blocking the run
MODELS = ("scripted echo", "scripted tool-calls", "llava")
PARSE_ERRORS = {"invalid_type", "invalid_value", "missing_required_parameter", "invalid_json"}
# Strings JSON allows that tend to break code: a lone surrogate, NUL, BOM, bidi override, line
# separator, combining mark, the last code point, non-characters, a long emoji run.
ODD_TEXT = ["\ud800", "\udfff", "\x00", "\ufeff", "\u202e", "\u2028", "e\u0301", "\U0010ffff"]
ODD_TEXT += ["\uffff", "🐍" * 200, "", " ", "{", '"', "\\", "null"]
HUGE = [10**400, -(10**400), 2**63, -(2**63) - 1, 1e308, -1e308, 5e-324, math.inf, math.nan]
DEEP = "\x00deep\x00"  # replaced by deep brackets once encoded


def fuzz(examples: int) -> settings:
    """Deterministic, no example database, sized to keep the module well under 30 s."""
    return settings(
        derandomize=True,
        database=None,
        deadline=None,
        max_examples=examples,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyServer]:
    root = tmp_path_factory.mktemp("fuzz")
    with ScriptedUpstream() as upstream, FakeOllama(installed=["llava:7b"]) as ollama:
        entries: list[dict[str, Any]] = [
            {
                "name": f"scripted_{scenario}",
                "display_name": f"scripted {scenario}",
                "backend": "external",
                "served_model_id": scenario,
                "backend_config": {"base_url": f"{upstream.url}/v1"},
            }
            for scenario in ("echo", "tool-calls")
        ]
        entries.append(  # --num-ctx: every request takes Ollama's native /api/chat
            {
                "name": "llava",
                "backend": "ollama",
                "served_model_id": "llava:7b",
                "capabilities": {"vision": True, "tools": True},
                "backend_config": {"base_url": ollama.url, "extra_args": ["--num-ctx", "4096"]},
            }
        )
        write_json(root / "configs" / "model_registry.curated.json", entries)
        with ProxyServer(root / "configs", root, include_non_installed=True) as server:
            yield server


@pytest.fixture(scope="module")
def client(proxy: ProxyServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.url, timeout=REQUEST_TIMEOUT_S) as http:
        yield http


@pytest.fixture(scope="module")
def request_schema(client: httpx.Client) -> dict[str, Any]:
    """The chat request schema, from the document the proxy serves."""
    document = client.get("/v1/openapi.json").json()
    schemas: dict[str, Any] = document["components"]["schemas"]
    return {"schema": schemas["ChatCompletionRequest"], "defs": schemas}


# -- JSON Schema -> strategies (the subset pydantic writes) --------------------------------------


def _lone_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(char) <= 0xDFFF for char in text)


# Odd but Unicode (a lone surrogate is not a Unicode string: parsers refuse it, so do we).
_texts = st.text(max_size=8) | st.sampled_from([t for t in ODD_TEXT if not _lone_surrogate(t)])
_any_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_infinity=False, allow_nan=False)
    | _texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_texts, inner, max_size=3),
    max_leaves=6,
)


def from_schema(schema: dict[str, Any], defs: dict[str, Any]) -> st.SearchStrategy[Any]:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return st.deferred(lambda: from_schema(defs[name], defs))
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    for key in ("oneOf", "anyOf"):
        if key in schema:
            return st.one_of([from_schema(option, defs) for option in schema[key]])
    kinds = schema.get("type")
    if isinstance(kinds, list):
        return st.one_of([from_schema({**schema, "type": kind}, defs) for kind in kinds])
    if kinds is None and "properties" not in schema:
        return _any_json
    return _typed(kinds or "object", schema, defs)


def _typed(kind: str, schema: dict[str, Any], defs: dict[str, Any]) -> st.SearchStrategy[Any]:
    low, high = schema.get("minimum"), schema.get("maximum")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(low, high)
    if kind == "number":
        return st.integers(low, high) | st.floats(low, high, allow_nan=False, allow_infinity=False)
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=8)
    if kind == "array":
        items = from_schema(schema.get("items", {}), defs)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=3)
    properties = schema.get("properties", {})
    required = [name for name in properties if name in schema.get("required", ())]
    optional = [name for name in properties if name not in required]
    fields = {name: from_schema(sub, defs) for name, sub in properties.items()}
    extra = schema.get("additionalProperties", False)
    if isinstance(extra, dict):
        more = st.dictionaries(_texts, from_schema(extra, defs), max_size=2)
    elif extra is True:  # unknown fields, named so they never collide with declared ones
        more = st.dictionaries(_texts.map(lambda key: f"x_{key}"), _any_json, max_size=1)
    else:
        more = st.just({})

    @st.composite
    def objects(draw: st.DrawFn) -> dict[str, Any]:
        # A few optional fields at a time: every field is reached, and examples stay small.
        names = st.lists(st.sampled_from(optional), unique=True, max_size=4)
        chosen = draw(names) if optional else []
        body: dict[str, Any] = draw(more)
        body.update((name, draw(fields[name])) for name in [*required, *chosen])
        return body

    return objects()


@st.composite
def valid_requests(draw: st.DrawFn, schema: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = draw(from_schema(schema["schema"], schema["defs"]))
    # Mostly models that answer, and streams as often as not: the paths worth reaching.
    body["model"] = draw(st.sampled_from(MODELS) | st.text(min_size=1, max_size=8))
    if draw(st.booleans()):
        body["stream"] = True
    return body


# -- mutations ----------------------------------------------------------------------------------


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def _set(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _set(value[head], rest, new)}
    copy = list(value)
    copy[head] = _set(copy[head], rest, new)
    return copy


def _drop(value: Any, path: tuple[Any, ...]) -> Any:
    if len(path) == 1:
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if k != path[0]}
        return [v for i, v in enumerate(value) if i != path[0]]
    head = path[0]
    if isinstance(value, dict):
        return {**value, head: _drop(value[head], path[1:])}
    copy = list(value)
    copy[head] = _drop(copy[head], path[1:])
    return copy


def _encode(body: Any, depth: int = 0) -> bytes:
    raw = json.dumps(body).encode()  # ensure_ascii: lone surrogates become \ud800 escapes
    deep = json.dumps(DEEP).encode()
    return raw.replace(deep, b"[" * depth + b"]" * depth) if depth else raw


@st.composite
def mutated_requests(draw: st.DrawFn, schema: dict[str, Any]) -> bytes:
    body = draw(valid_requests(schema))
    paths = [path for path in _paths(body) if path]
    path = draw(st.sampled_from(paths))
    kind = draw(
        st.sampled_from(
            ["retype", "drop", "huge", "deep", "unicode", "raw-unicode", "cut", "bytes", "top"]
        )
    )
    if kind == "retype":
        return _encode(_set(body, path, draw(_any_json)))
    if kind == "drop":
        return _encode(_drop(body, path))
    if kind == "huge":
        return _encode(_set(body, path, draw(st.sampled_from(HUGE))))
    if kind == "deep":
        depth = draw(st.sampled_from([63, 64, 65, 200, 1_000, 5_000, 50_000]))
        return _encode(_set(body, path, DEEP), depth)
    if kind == "unicode":
        return _encode(_set(body, path, draw(st.sampled_from(ODD_TEXT))))
    if kind == "raw-unicode":  # not escaped: a lone surrogate becomes bytes that are not UTF-8
        odd = _set(body, path, draw(st.sampled_from(ODD_TEXT)))
        return json.dumps(odd, ensure_ascii=False).encode("utf-8", "surrogatepass")
    if kind == "cut":
        raw = _encode(body)
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    return _encode(draw(_any_json))  # a JSON document that is not an object


# -- what every answer must be ------------------------------------------------------------------


def assert_openai_error(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/json"), response.text[:200]
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)
    return dict(error)


def chat(client: httpx.Client, content: bytes) -> httpx.Response:
    """POST the body and read the whole answer (streams to their end)."""
    headers = {"content-type": "application/json"}
    with client.stream("POST", "/v1/chat/completions", content=content, headers=headers) as r:
        r.read()
    assert r.status_code < 500, r.text[:500]
    if r.status_code >= 400:
        assert_openai_error(r)
    elif r.headers["content-type"].startswith("text/event-stream"):
        data = [line[5:].strip() for line in r.text.splitlines() if line.startswith("data:")]
        assert data[-1] == "[DONE]", data[-3:]
        for chunk in data[:-1]:
            assert isinstance(json.loads(chunk), dict)
    else:
        assert "choices" in r.json()
    return r


# -- the tests ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def valid(request_schema: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    return valid_requests(request_schema)


@pytest.fixture(scope="module")
def mutated(request_schema: dict[str, Any]) -> st.SearchStrategy[bytes]:
    return mutated_requests(request_schema)


def test_schema_valid_requests_are_answered_or_refused_cleanly_never_as_malformed(
    client: httpx.Client, valid: st.SearchStrategy[dict[str, Any]]
) -> None:
    @fuzz(150)
    @given(body=valid)
    def check(body: dict[str, Any]) -> None:
        response = chat(client, _encode(body))
        if response.status_code >= 400:  # an unknown model, an image URL not allowed ...
            assert response.json()["error"]["code"] not in PARSE_ERRORS, response.text

    check()


def test_mutated_requests_are_refused_cleanly(
    client: httpx.Client, mutated: st.SearchStrategy[bytes]
) -> None:
    @fuzz(200)
    @given(raw=mutated)
    def check(raw: bytes) -> None:
        chat(client, raw)

    check()


_methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
_segments = st.text(max_size=12) | st.sampled_from(["smollm2 135m (Q4 1)", "..", "%", "a/b"])


def test_models_endpoints_answer_cleanly(client: httpx.Client) -> None:
    @fuzz(100)
    @given(
        method=_methods,
        segment=st.none() | _segments,
        query=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
        content=st.binary(max_size=32),
    )
    def check(method: str, segment: str | None, query: dict[str, str], content: bytes) -> None:
        path = "/v1/models"
        if segment is not None:
            path += "/" + urllib.parse.quote(segment, safe="")
        sent = content if method not in ("GET", "HEAD") else b""
        response = client.request(method, path, params=query, content=sent)
        assert response.status_code < 500, response.text[:500]
        if method == "HEAD":
            return
        if 300 <= response.status_code < 400:  # `/v1/models/` redirects to `/v1/models`
            assert response.headers["location"]
        elif response.status_code >= 400:
            assert_openai_error(response)
        else:
            assert response.json()["object"] in ("list", "model")

    check()


def test_the_proxy_is_still_healthy_after_the_fuzz(client: httpx.Client) -> None:
    assert client.get("/v1/health").json()["status"] == "ok"
    body = {"model": "scripted echo", "messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
