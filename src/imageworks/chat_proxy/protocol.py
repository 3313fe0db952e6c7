"""The OpenAI wire protocol as the proxy speaks it: request checks, error envelopes, SSE framing.

Errors, rendered as `{"error": {message, type, param, code}}` by one handler in `app.py`, or by
the chat owner itself (`sse.Reply.fail`: the same body, or an SSE error event once a stream began):

    ProxyError                      status, type, message, param, code (, headers)
    ├── InvalidRequest      400     malformed or too deeply nested JSON, a field of the wrong type
    │   │                           or value (`requests.py`), input the backend rejected
    │   └── CapabilityError 400     the model lacks what the request needs (vision, tools)
    ├── PayloadTooLarge     413     an image (or all of them) beyond CHAT_PROXY_MAX_IMAGE_BYTES
    │   └── BodyTooLarge    413     a body beyond CHAT_PROXY_MAX_BODY_BYTES (and the connection
    │                               is closed: the rest is never read)
    ├── ModelNotFound       404     no registry entry answers to `model` (lists close names)
    ├── NotFoundError       404     an endpoint that is switched off
    ├── BackendUnavailable  503     the backend cannot be reached or started (names it)
    │   └── QueueTimeout    503     waited too long for the GPU slot, or the remote is down
    │                               (with Retry-After)
    ├── BadGateway          502     the backend answered with something that is not OpenAI
    │   └── StreamTruncated 502     a stream ended before any choice had a finish_reason
    ├── BackendTimeout      504     the backend said nothing within the configured time
    ├── UpstreamError       4xx/5xx the backend's own error, passed through with its status
    └── InternalError       500     a bug in the proxy (logged with its traceback)

This module imports no web framework, HTTP client or process code.
"""

from __future__ import annotations

import ast
import itertools
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import orjson

SSE_DONE = b"data: [DONE]\n\n"
_ERROR_FIELDS = ("message", "type", "param", "code")
# Containers nested deeper than this are refused before any parser recurses into them.
MAX_JSON_DEPTH = 64


class ProxyError(Exception):
    status: int = 500
    type: str = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def headers(self) -> dict[str, str]:
        """HTTP headers the error response carries besides its body."""
        return {}


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class CapabilityError(InvalidRequest):
    type = "capability_error"


class PayloadTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"


class BodyTooLarge(PayloadTooLarge):
    def __init__(self, limit: int) -> None:
        super().__init__(
            f"The request body is larger than {limit:,} bytes (CHAT_PROXY_MAX_BODY_BYTES).",
            code="body_too_large",
        )

    def headers(self) -> dict[str, str]:
        # The rest of the body is never read, so the connection cannot carry another request.
        return {"Connection": "close"}


class ModelNotFound(ProxyError):
    status = 404
    type = "invalid_request_error"

    def __init__(self, model: str, suggestions: list[str]) -> None:
        hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
        super().__init__(
            f"The model {model!r} does not exist.{hint} GET /v1/models lists the models.",
            param="model",
            code="model_not_found",
        )
        self.suggestions = suggestions


class NotFoundError(ProxyError):
    status = 404
    type = "invalid_request_error"


class BackendUnavailable(ProxyError):
    status = 503
    type = "backend_error"


class QueueTimeout(BackendUnavailable):
    def __init__(self, message: str, retry_after_s: float, code: str = "queue_timeout") -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        # Whole seconds, at least 1 (a non-finite guess is no guess: try again soon).
        wait = self.retry_after_s if math.isfinite(self.retry_after_s) else 1.0
        return {"Retry-After": str(max(1, math.ceil(wait)))}


class BadGateway(ProxyError):
    status = 502
    type = "backend_error"


class StreamTruncated(BadGateway):
    def __init__(self, message: str) -> None:
        super().__init__(message, code="stream_truncated")


class BackendTimeout(ProxyError):
    status = 504
    type = "backend_error"


class UpstreamError(ProxyError):
    """An error the backend itself returned; its status and body reach the client unchanged."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        error = body["error"]
        super().__init__(str(error.get("message", "")), param=error.get("param"))
        self.status = status
        self.type = str(error.get("type") or "upstream_error")
        self._body = body

    def body(self) -> dict[str, Any]:
        return self._body


class InternalError(ProxyError):
    def __init__(self, message: str) -> None:
        super().__init__(message, code="internal_error")


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def upstream_error(status: int, content: bytes, backend: str) -> ProxyError:
    """Translate a backend's error response. A 4xx keeps its status and, if it has one, its
    OpenAI error object (a context-length error must reach the client as the backend said it);
    a 5xx is the backend failing, so it becomes a 502 that quotes what the backend said, unless
    it is a backend blaming the request with the wrong status (then it is the client's 400)."""
    try:
        parsed: Any = parse_json(content)
    except (ValueError, UnicodeDecodeError):
        parsed = None
    said = _error_message(parsed) or content[:300].decode("utf-8", "replace").strip()
    if status >= 500:
        rejected = _rejected_input(said, backend)
        if rejected is not None:
            return rejected
        return BadGateway(
            f"backend {backend} failed with HTTP {status}" + (f": {said}" if said else ""),
            code="upstream_error",
        )
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict) and "message" in error:
        return UpstreamError(status, {"error": {**dict.fromkeys(_ERROR_FIELDS), **error}})
    message = said or f"backend {backend} answered HTTP {status}"
    return UpstreamError(status, error_body(message, "upstream_error"))


# llama-cpp-python answers a request its pydantic models reject with a 500 whose message is
# FastAPI's dump of the errors, each with a `'loc': ('body', ...)` (pydantic v1's FastAPI wrote
# "validation error for Request" and "body -> field"); llama-server (nlohmann::json) says
# "[json.exception.type_error.302] type must be number, but is string" of a request field.
# Anything else a backend fails with is its own failure.
_VALIDATION_DUMP = re.compile(r"\b\d+ validation errors?\b")
_BODY_ERROR = re.compile(
    r"'loc': \('body',?\s*(?P<loc>[^)]*)\),\s*'msg': (?:'(?P<a>[^']*)'|\"(?P<b>[^\"]*)\")"
)
_BODY_ERROR_V1 = re.compile(r"for Request\s+body -> (?P<loc>[^\n]+)\n\s*(?P<a>[^\n(]+)")
_JSON_TYPE_ERROR = re.compile(
    r"(?:Field '(?P<loc>[\w.]+)': )?(?P<error>\[json\.exception\.type_error\.\d+\])"
)
_FIELD = re.compile(r"[a-z_][a-z0-9_]*")
_TYPE_LABELS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _rejected_input(said: str, backend: str) -> InvalidRequest | None:
    """The 400 for a 5xx in which the backend says the request was invalid, else None."""
    found = _request_validation_error(said) or _json_type_error(said)
    if found is None:
        return None
    detail, loc = found
    return InvalidRequest(
        f"Backend {backend} rejected the request: {detail.strip()}",
        param=_backend_param(loc),
        code="backend_rejected_request",
    )


def _request_validation_error(said: str) -> tuple[str, list[Any]] | None:
    """The first error (message, location) of a FastAPI dump about the request body."""
    if _VALIDATION_DUMP.search(said) is None:
        return None
    found = _BODY_ERROR.search(said) or _BODY_ERROR_V1.search(said)
    if found is None:
        return None
    return found["a"] or found.groupdict().get("b") or "", _loc_parts(found["loc"])


def _json_type_error(said: str) -> tuple[str, list[Any]] | None:
    found = _JSON_TYPE_ERROR.search(said)
    if found is None:
        return None
    detail = said[found.start("error") :].split("\n", 1)[0]
    return detail, found["loc"].split(".") if found["loc"] else []


def _loc_parts(text: str) -> list[Any]:
    """`'messages', 1, 'role'` (a tuple's inside) or `messages -> 1 -> role` as a list."""
    if len(text) > 500:
        return []
    if "'" not in text and '"' not in text:
        return [int(p) if p.strip().isdigit() else p.strip() for p in text.split("->")]
    try:
        parsed = ast.literal_eval(f"({text},)")
    except (ValueError, SyntaxError, RecursionError, MemoryError):
        return []
    return list(parsed) if isinstance(parsed, tuple) else []


def _backend_param(loc: list[Any]) -> str | None:
    """The field a backend's error location names, as OpenAI writes it. Message indices are
    not the client's (the proxy may have added a system prompt or dropped turns), and union
    labels such as `str` or `ChatCompletionRequestUserMessage` are not fields: both end it."""
    if not loc or loc[0] == "messages":
        return "messages" if loc else None
    text = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            text += f"[{part}]"
        elif isinstance(part, str) and _FIELD.fullmatch(part) and part not in _TYPE_LABELS:
            text += f".{part}" if text else part
        else:
            break
    return text or None


def _error_message(parsed: Any) -> str | None:
    """The message in the error shapes backends use: OpenAI's `{"error": {"message"}}`,
    llama.cpp's and Ollama's `{"error": "text"}`, FastAPI's `{"detail": "text"}`."""
    if not isinstance(parsed, dict):
        return None
    error = parsed.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    for value in (error, parsed.get("detail"), parsed.get("message")):
        if isinstance(value, str):
            return value
    return None


def json_bytes(data: Any) -> bytes:
    """Compact UTF-8 JSON: the encoding of every body and event the proxy writes itself.

    orjson, about ten times faster than the json module; what it refuses but JSON can say (an
    integer beyond 64 bits, a dict key that is not a string) goes through the json module."""
    try:
        return orjson.dumps(data)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def parse_json(raw: bytes) -> Any:
    """JSON from a backend, parsed by orjson (about five times faster than the json module).
    orjson reads an integer beyond 64 bits as a float, so a document with a run of 19 digits
    (which may be one) goes to the json module, as does one orjson refuses (NaN, which the
    json module takes). ValueError if it is not JSON."""
    if _LONG_DIGITS.search(raw) is None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:  # a ValueError
            pass
    return json.loads(raw)


# Integers orjson reads exactly have at most 18 digits (int64 holds 18 digits, and some of 19).
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


def sse_event(data: Mapping[str, Any]) -> bytes:
    return b"data: " + json_bytes(data) + b"\n\n"


def sse_error(error: ProxyError) -> bytes:
    """The event that ends a stream that already sent its headers (then `SSE_DONE`)."""
    return sse_event(error.body())


# A JSON string: a valid document's strings are exactly the leftmost matches of this, in order.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_STEPS = bytes.maketrans(b"[{]}", bytes([1, 1, 255, 255]))  # +1 and -1 as signed bytes


def json_shape_problem(raw: bytes, max_depth: int) -> str | None:
    """Why `raw` must not reach a JSON parser, or None: containers nested deeper than
    `max_depth` (parsers recurse once per level; CPython's json raises RecursionError at a few
    thousand), or NaN/Infinity, which Python's parsers accept but JSON does not have.

    Only what lies outside strings counts, so the strings are cut out first. Then the depth at
    each point is the number of brackets opened so far minus those closed, and the deepest a
    parser can go is its maximum (for a document that is not valid JSON, at least as deep as a
    parser gets before it fails). Linear, and in C but for the final sum."""
    few = raw.count(b"[") + raw.count(b"{") <= max_depth
    if few and b"NaN" not in raw and b"Infinity" not in raw:
        return None  # the usual request: too few brackets, even in strings, to be that deep
    outside = _JSON_STRING.sub(b"", raw)
    if b"NaN" in outside or b"Infinity" in outside:
        return "NaN and Infinity are not JSON numbers"
    brackets = outside.translate(None, delete=_NOT_BRACKETS)
    if brackets.count(b"[") + brackets.count(b"{") <= max_depth:
        return None
    steps = memoryview(brackets.translate(_STEPS)).cast("b")
    if max(itertools.accumulate(steps)) > max_depth:
        return f"it is nested deeper than {max_depth} levels"
    return None
