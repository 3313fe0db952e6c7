"""The access guard: the proxy's outermost ASGI layer, deciding whether a request is served.

Each HTTP request meets these checks in order; the first that fails answers, in OpenAI's error
shape, and the app never sees the request:

    check                                          refusal
    a  Host is a loopback name (loopback bind)     403 host_not_allowed         DNS rebinding
    b  a CORS preflight                            204 for a listed origin, else 403
                                                   origin_not_allowed
    c  Origin of a state-changing request          403 origin_not_allowed       another web page
    d  Content-Type of a state-changing admin      415 unsupported_media_type   forces a preflight
       request is JSON
    e  an API key (CHAT_PROXY_API_KEYS set)        401 invalid_api_key
    f  the admin key (CHAT_PROXY_ADMIN_KEY set)    403 insufficient_permissions for a user key,
                                                   401 invalid_api_key for none or a wrong one

Without keys (the default) only a-d apply: a web page open in the user's browser can neither
reach the API through a rebinding DNS name nor change anything from another origin. (a) is what
Ollama did for CVE-2024-28224. An admitted request passes through untouched, its stream never
buffered; only its answer gains CORS headers when CHAT_PROXY_ALLOWED_ORIGINS lists its origin.

Keys are compared as SHA-256 digests with `hmac.compare_digest`, against every configured key,
so neither a key's length nor which key matched shows in the time taken; no key is ever logged
or written into an answer.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imageworks.chat_proxy.config import ProxySettings
from imageworks.chat_proxy.protocol import error_body, json_bytes

log = logging.getLogger("imageworks.chat_proxy.guard")

Headers = tuple[tuple[bytes, bytes], ...]

# Methods a browser may send to any origin without asking (their answers it cannot read).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# A pseudo-method for websocket handshakes: a browser opens them to any origin without a CORS
# check, so they are held to the Origin rule like a state-changing request.
WEBSOCKET = "WEBSOCKET"
# The only headers the guard looks at (their first occurrence, as Starlette's `Headers.get`).
_READ = frozenset(
    b"host origin authorization content-type content-length transfer-encoding "
    b"access-control-request-method access-control-request-headers "
    b"access-control-request-private-network".split()
)
_PORT = re.compile(r"[0-9]*")
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"  # an HTTP header name
_HEADER_LIST = re.compile(rf"{_TOKEN}(?:[ \t]*,[ \t]*{_TOKEN})*")
_HOSTS_KEPT = 32
_SHOWN = 100  # of a Host or Origin quoted back: enough to recognise, not a log flood


# -- the rules, as pure functions ----------------------------------------------------------------


def hostname(host: str) -> str | None:
    """The name in a Host header (`localhost:8100`, `[::1]:8100`, `Example.`), lower-cased,
    without port or trailing dot; None when the header is not `host[:port]`."""
    text = host.strip().lower()
    if text.startswith("["):
        name, bracket, rest = text[1:].partition("]")
        port_ok = not rest or (rest[0] == ":" and _PORT.fullmatch(rest[1:]) is not None)
        if not bracket or not port_ok:
            return None
    else:
        name, _, port = text.partition(":")
        if _PORT.fullmatch(port) is None:  # also a bare IPv6 address, which needs brackets
            return None
    name = name.removesuffix(".")
    return name or None


def is_loopback(name: str) -> bool:
    """`localhost` and `*.localhost` (RFC 6761 reserves them for loopback), 127.0.0.0/8, ::1
    and IPv4-mapped 127.x addresses. `name` is lower-case, without port or brackets."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def binds_loopback(bind_host: str) -> bool:
    """Whether the proxy listens on loopback only (`0.0.0.0` or a LAN address: no)."""
    return is_loopback(bind_host.strip().strip("[]").lower())


def checks_host(bind_host: str, allowed_hosts: Iterable[str]) -> bool:
    """Whether Host names are checked: on a loopback bind, and on any bind whose names are
    listed. A container binds 0.0.0.0 behind a port published on the host's loopback (as the
    compose files do, listing `chat-proxy`): its Host check must not depend on the bind."""
    names = frozenset(allowed_hosts)
    return "*" not in names and (binds_loopback(bind_host) or bool(names))


def host_allowed(host_header: str | None, bind_host: str, allowed_hosts: Iterable[str]) -> bool:
    """Where Host names are checked (`checks_host`), only loopback names and the names listed
    are served: a page whose DNS name an attacker points at 127.0.0.1 sends its own name. A
    request without a Host (HTTP/1.0) is no browser's. Beyond loopback, with no names listed,
    the names clients use are not known."""
    if host_header is None or not checks_host(bind_host, allowed_hosts):
        return True
    return _served(host_header, _host_names(allowed_hosts))


def _host_names(allowed_hosts: Iterable[str]) -> frozenset[str]:
    # A listed `chat-proxy:8100` means the name; a port is no part of the check.
    return frozenset(hostname(host) or host for host in allowed_hosts)


def _served(host_header: str, names: frozenset[str]) -> bool:
    name = hostname(host_header)
    return name is not None and (name in names or is_loopback(name))


def cors_allowed(origin: str, allowed_origins: frozenset[str]) -> bool:
    """Whether answers to `origin` carry CORS headers: it is listed, or `*` is."""
    return "*" in allowed_origins or origin.lower() in allowed_origins


def origin_allowed(
    origin: str | None, host_header: str | None, allowed_origins: frozenset[str]
) -> bool:
    """Whether a request with this Origin may change things: none (not a browser's), a listed
    origin, or the proxy's own (the dashboard: `http://` or, behind a TLS proxy, `https://`
    and the Host the request was sent to). `null` is a sandboxed or opaque page: foreign."""
    if origin is None or cors_allowed(origin, allowed_origins):
        return True
    if host_header is None:
        return False
    own = host_header.strip().lower()
    return origin.lower() in (f"http://{own}", f"https://{own}")


def is_admin_path(path: str) -> bool:
    return path == "/v1/admin" or path.startswith("/v1/admin/")


def is_open_path(path: str) -> bool:
    """Paths served without an API key: the health check, and the dashboard's static files
    (its buttons call `/v1/admin/*`, which is guarded)."""
    return path in ("/v1/health", "/ui") or path.startswith("/ui/")


def is_json(content_type: str) -> bool:
    """`application/json`, with or without parameters (`; charset=utf-8`)."""
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


def has_body(headers: Mapping[bytes, bytes]) -> bool:
    declared = headers.get(b"content-length", b"").strip()
    return b"transfer-encoding" in headers or (declared not in (b"", b"0"))


def admin_body_allowed(headers: Mapping[bytes, bytes]) -> bool:
    """A state-changing admin request is JSON, which a web page cannot send to another origin
    without a CORS preflight (`text/plain`, forms and multipart are "simple requests" that
    skip it). Also allowed: no body and no Content-Type at all from a client that sends no
    Origin, which is `curl -X POST` or `httpx.post(url)` (`imageworks-loader activate-model
    --stop`): browsers send an Origin with every POST, so none of theirs is let through."""
    content_type = headers.get(b"content-type")
    if content_type is not None:
        return is_json(content_type.decode("latin-1"))
    return b"origin" not in headers and not has_body(headers)


def bearer_token(authorization: bytes | None) -> bytes | None:
    """The key in `Authorization: Bearer <key>`; None for no header, another scheme, no key."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    token = token.strip()
    return token if scheme.lower() == b"bearer" and token else None


class Role(enum.Enum):
    NONE = "no key"
    UNKNOWN = "a key that is not configured"
    USER = "a user key"
    ADMIN = "the admin key"


class KeyRing:
    """The configured keys as SHA-256 digests: all of one length for `compare_digest`."""

    def __init__(self, api_keys: Iterable[str], admin_key: str | None) -> None:
        self._users = tuple(_digest(key.encode()) for key in api_keys)
        self._admin = _digest(admin_key.encode()) if admin_key else None
        self.has_users = bool(self._users)
        self.has_admin = self._admin is not None

    def role(self, token: bytes | None) -> Role:
        if token is None:
            return Role.NONE
        digest = _digest(token)
        # Every key is compared, whichever matches: the time depends on their number alone.
        user = False
        for key in self._users:
            user |= hmac.compare_digest(digest, key)
        admin = self._admin is not None and hmac.compare_digest(digest, self._admin)
        if admin:
            return Role.ADMIN
        return Role.USER if user else Role.UNKNOWN


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def startup_warnings(settings: ProxySettings) -> list[str]:
    """What the operator must hear at start-up about who can reach the proxy."""
    warnings = []
    if not binds_loopback(settings.host):
        if not settings.api_keys:
            reach = "the models" if settings.admin_key else "the models and the admin endpoints"
            warnings.append(
                f"listening on {settings.host} without API keys: anyone who can reach it can use "
                f"{reach}; set CHAT_PROXY_API_KEYS, or keep it on a trusted network"
            )
        elif not settings.admin_key:
            warnings.append(
                "CHAT_PROXY_ADMIN_KEY is not set: every user key may stop and switch the model "
                "(the admin endpoints)"
            )
    if "*" in settings.allowed_origins:
        warnings.append(
            "CHAT_PROXY_ALLOWED_ORIGINS=* trusts every web page the user opens"
            + ("" if settings.api_keys else ", and there are no API keys: any page can use it")
        )
    return warnings


# -- the decision for one request ----------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """A response the guard gives itself, instead of the app's."""

    status: int
    headers: Headers
    body: bytes = b""


class AccessPolicy:
    """The settings' rules, prepared once. `decide` depends on the request alone; it logs
    refusals of a Host or Origin (so the operator can add a name), nothing else."""

    def __init__(self, settings: ProxySettings) -> None:
        self._check_host = checks_host(settings.host, settings.allowed_hosts)
        self._hosts = _host_names(settings.allowed_hosts)
        # Clients send a handful of Host values, and parsing one costs more than all the other
        # checks together: the first verdicts are remembered (a bounded number, since clients
        # choose what they send).
        self._host_verdicts: dict[str, bool] = {}
        self._origins = settings.allowed_origins
        self._keys = KeyRing(settings.api_keys, settings.admin_key)
        # With CORS configured every answer may depend on the Origin: say so to caches.
        self._vary: Headers = ((b"vary", b"Origin"),) if settings.allowed_origins else ()

    def decide(self, method: str, path: str, headers: Mapping[bytes, bytes]) -> Answer | Headers:
        """The guard's own answer, or the headers to add to the app's."""
        host = _text(headers.get(b"host"))
        origin = _text(headers.get(b"origin"))
        if self._check_host and host is not None and not self._host_served(host):
            log.info("refused Host %r (not a loopback name)", host[:_SHOWN])
            return _refuse(403, "host_not_allowed", _host_message(host), (), headers)
        cors = self._cors(origin)
        preflight = b"access-control-request-method" in headers
        if method == "OPTIONS" and origin is not None and preflight:
            return self._preflight(origin, headers)
        changes = method not in SAFE_METHODS
        if changes and origin is not None and not origin_allowed(origin, host, self._origins):
            log.info("refused Origin %r on %s %s", origin[:_SHOWN], method, path)
            message = _origin_message(origin)
            return _refuse(403, "origin_not_allowed", message, self._vary, headers)
        admin_change = changes and method != WEBSOCKET and is_admin_path(path)
        if admin_change and not admin_body_allowed(headers):
            message = (
                "Admin requests that change something need 'Content-Type: application/json' "
                "(and a JSON body, {} if there is nothing to say)."
            )
            return _refuse(415, "unsupported_media_type", message, cors, headers)
        refusal = self._authorize(path, headers, cors)
        return refusal if refusal is not None else cors

    def _host_served(self, host: str) -> bool:
        served = self._host_verdicts.get(host)
        if served is None:
            served = _served(host, self._hosts)
            if len(self._host_verdicts) < _HOSTS_KEPT:
                self._host_verdicts[host] = served
        return served

    def _cors(self, origin: str | None) -> Headers:
        if origin is None or not self._vary:
            return self._vary
        if cors_allowed(origin, self._origins):
            return (
                (b"access-control-allow-origin", origin.encode("latin-1")),
                (b"access-control-expose-headers", b"Retry-After, WWW-Authenticate"),
                *self._vary,
            )
        return self._vary

    def _preflight(self, origin: str, headers: Mapping[bytes, bytes]) -> Answer:
        if not cors_allowed(origin, self._origins):
            log.info("refused a CORS preflight from %r", origin[:_SHOWN])
            message = _origin_message(origin)
            return _refuse(403, "origin_not_allowed", message, self._vary, headers)
        # A listed origin is trusted: the headers it asks for are allowed (the OpenAI SDK for
        # JavaScript sends its own `x-stainless-*` ones besides Authorization and Content-Type).
        asked = headers.get(b"access-control-request-headers", b"").decode("latin-1").strip()
        allowed = asked if _HEADER_LIST.fullmatch(asked) else "Authorization, Content-Type"
        answer = [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
            (b"access-control-allow-headers", allowed.encode("latin-1")),
            (b"access-control-max-age", b"600"),
            (b"vary", b"Origin, Access-Control-Request-Headers"),
        ]
        # Chrome's Private Network Access asks before a public page may reach a local address.
        if headers.get(b"access-control-request-private-network", b"").lower() == b"true":
            answer.append((b"access-control-allow-private-network", b"true"))
        return Answer(204, tuple(answer))

    def _authorize(self, path: str, headers: Mapping[bytes, bytes], cors: Headers) -> Answer | None:
        if is_admin_path(path) and self._keys.has_admin:
            needed = Role.ADMIN
        elif self._keys.has_users and not is_open_path(path):
            needed = Role.USER
        else:
            return None
        role = self._keys.role(bearer_token(headers.get(b"authorization")))
        if role is Role.ADMIN or (role is Role.USER and needed is Role.USER):
            return None
        if role is Role.USER:
            message = "This API key may not use the admin endpoints: they need the admin key."
            return _refuse(403, "insufficient_permissions", message, cors, headers)
        which = "the admin key" if needed is Role.ADMIN else "an API key"
        if role is Role.NONE:
            message = (
                f"You didn't provide an API key. This endpoint needs {which}, sent as "
                "'Authorization: Bearer <key>'."
            )
        else:  # the key itself is never quoted, not even masked
            message = f"Incorrect API key provided. This endpoint needs {which}."
        challenge = ((b"www-authenticate", b"Bearer"), *cors)
        return _refuse(401, "invalid_api_key", message, challenge, headers)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _host_message(host: str) -> str:
    return (
        f"The host name {host[:_SHOWN]!r} is not served here: the proxy listens on loopback and "
        "answers only loopback names, so that a web page cannot reach it through a DNS name of "
        "its own (DNS rebinding). To use this name, add it to CHAT_PROXY_ALLOWED_HOSTS."
    )


def _origin_message(origin: str) -> str:
    return (
        f"Requests from the web page at {origin[:_SHOWN]!r} may not change anything here. "
        "To trust that origin, add it to CHAT_PROXY_ALLOWED_ORIGINS."
    )


def _refuse(
    status: int, code: str, message: str, extra: Headers, request: Mapping[bytes, bytes]
) -> Answer:
    body = json_bytes(error_body(message, "invalid_request_error", None, code))
    headers: Headers = (
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra,
    )
    if has_body(request):
        # The body is never read, so the connection cannot carry another request.
        headers = (*headers, (b"connection", b"close"))
    return Answer(status, headers, body)


# -- the ASGI layer ------------------------------------------------------------------------------


class AccessGuard:
    """Pure ASGI (a BaseHTTPMiddleware would buffer streams): the headers are read once, the
    policy decides, and an admitted request goes on with `receive` and `send` as they were,
    or with a `send` that adds CORS headers to the response's start."""

    def __init__(self, app: ASGIApp, settings: ProxySettings) -> None:
        self.app = app
        self.policy = AccessPolicy(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method = str(scope["method"])
        elif scope["type"] == "websocket":
            method = WEBSOCKET
        else:  # lifespan
            await self.app(scope, receive, send)
            return
        verdict = self.policy.decide(method, scope["path"], first_headers(scope["headers"]))
        if isinstance(verdict, Answer):
            if method == WEBSOCKET:  # closed before it is accepted: the server answers 403
                await receive()
                await send({"type": "websocket.close", "code": 1008})
                return
            await send(
                {
                    "type": "http.response.start",
                    "status": verdict.status,
                    "headers": verdict.headers,
                }
            )
            await send({"type": "http.response.body", "body": verdict.body})
            return
        if not verdict or method == WEBSOCKET:
            await self.app(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *verdict]}
            await send(message)

        await self.app(scope, receive, send_with_cors)


def first_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """The headers the guard reads (ASGI names are lower-case), each at its first occurrence."""
    found: dict[bytes, bytes] = {}
    for name, value in raw:
        if name in _READ and name not in found:
            found[name] = value
    return found
