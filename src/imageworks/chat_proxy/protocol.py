"""The OpenAI wire protocol as the proxy speaks it: request checks, error envelopes, SSE framing.

Errors, rendered as `{"error": {message, type, param, code}}` by one handler in `app.py`, or by
the chat owner itself (`sse.Reply.fail`: the same body, or an SSE error event once a stream began):

    ProxyError                      status, type, message, param, code (, headers)
    ├── InvalidRequest      400     malformed JSON or a body that is not a chat request
    │   └── CapabilityError 400     the model lacks what the request needs (vision, tools)
    ├── PayloadTooLarge     413     an image (or all of them) beyond CHAT_PROXY_MAX_IMAGE_BYTES
    ├── ModelNotFound       404     no registry entry answers to `model` (lists close names)
    ├── NotFoundError       404     an endpoint that is switched off
    ├── BackendUnavailable  503     the backend cannot be reached or started (names it)
    │   └── QueueTimeout    503     waited too long for the GPU slot (with Retry-After)
    ├── BadGateway          502     the backend answered with something that is not OpenAI
    │   └── StreamTruncated 502     a stream ended before any choice had a finish_reason
    ├── BackendTimeout      504     the backend said nothing within the configured time
    ├── UpstreamError       4xx/5xx the backend's own error, passed through with its status
    └── InternalError       500     a bug in the proxy (logged with its traceback)

This module imports no web framework, HTTP client or process code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

SSE_DONE = b"data: [DONE]\n\n"
_ERROR_FIELDS = ("message", "type", "param", "code")


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
    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message, code="queue_timeout")
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
    a 5xx is the backend failing, so it becomes a 502 that quotes what the backend said."""
    try:
        parsed: Any = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        parsed = None
    said = _error_message(parsed) or content[:300].decode("utf-8", "replace").strip()
    if status >= 500:
        return BadGateway(
            f"backend {backend} failed with HTTP {status}" + (f": {said}" if said else ""),
            code="upstream_error",
        )
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict) and "message" in error:
        return UpstreamError(status, {"error": {**dict.fromkeys(_ERROR_FIELDS), **error}})
    message = said or f"backend {backend} answered HTTP {status}"
    return UpstreamError(status, error_body(message, "upstream_error"))


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
    """Compact UTF-8 JSON: the encoding of every body and event the proxy writes itself."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def sse_event(data: Mapping[str, Any]) -> bytes:
    return b"data: " + json_bytes(data) + b"\n\n"


def sse_error(error: ProxyError) -> bytes:
    """The event that ends a stream that already sent its headers (then `SSE_DONE`)."""
    return sse_event(error.body())


def parse_chat_request(raw: bytes) -> dict[str, Any]:
    """The request body as a dict, with the fields the proxy relies on checked.

    Only what the proxy needs is checked; everything else is the backend's to judge, and every
    field (known or not) is forwarded."""
    try:
        body: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(
            f"The request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("'model' is required and must be a non-empty string.", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array.", param="messages")
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(
                f"messages[{position}] must be an object with a string 'role'.",
                param=f"messages[{position}]",
            )
    if "stream" in body and body["stream"] is not None and not isinstance(body["stream"], bool):
        raise InvalidRequest("'stream' must be a boolean.", param="stream")
    return body
