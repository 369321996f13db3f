"""Access control: Host and Origin checks, content types, the API key and CORS.

DNS rebinding: a page on a name the attacker controls can point that name at
127.0.0.1 and then talk to the server as same-origin. Such requests carry the
attacker's name in Host, so (like Ollama) only Host headers naming a loopback
address, `localhost`, the bound address, or a configured name
(settings.allowed_hosts, or the host of a configured origin) are served;
anything else is 403. When bound to an unspecified address (0.0.0.0, ::), any
IP literal is accepted too (rebinding needs a name), names still must be
configured.

CSRF: browsers send cross-origin "simple" POSTs (text/plain, forms) without a
preflight. A request whose Origin header is not allowed is refused (403) unless
its method is safe (GET, HEAD, OPTIONS), whatever its content type, so it never
changes state nor starts work. A request without Origin does not come from a
web page (browsers send Origin on every POST), which keeps `curl -d` working.
Bodies of state-changing requests must be JSON: other content types get 415,
except the form type curl -d sends when no Origin is present, as Ollama accepts.

When settings.api_key is set, every API route requires it: `Authorization:
Bearer <key>` everywhere, and also `x-api-key` on the Anthropic routes
(/v1/messages, what the anthropic SDK sends). A missing or wrong key is a 401
in the route family's error shape. `GET/HEAD /` and `/api/version` stay open
so health checks and version probes work without the key, and so does the
status page `/ui` (a static page that asks for the key; its data needs it); CORS preflights
(OPTIONS with Access-Control-Request-Method) are answered before the key is
checked, as browsers send them without credentials.

Allowed browser origins are settings.origins (glob patterns, "*" for any)
plus local ones, as Ollama allows by default: http(s) on localhost,
127.0.0.1, 0.0.0.0 and [::1] on any port, and app://, file://, tauri:// and
vscode-webview:// origins.
"""

from __future__ import annotations

import fnmatch
import hmac
import ipaddress
import re
from collections.abc import Sequence

from corral.supervisor.api.errors import error_response, family_for_path
from corral.supervisor.config import Settings
from corral.supervisor.errors import CorralError, Forbidden, Unauthorized, UnsupportedMediaType
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

OPEN_PATHS = frozenset({"/api/version", "/ui"})  # /ui: the status page holds no data itself
LOCAL_ORIGIN_PATTERNS = (
    r"https?://(localhost|127\.0\.0\.1|0\.0\.0\.0|\[::1\])(:\d+)?",
    r"(app|file|tauri|vscode-webview)://.*",
)


def is_open(method: str, path: str) -> bool:
    return path in OPEN_PATHS or (path == "/" and method in ("GET", "HEAD"))


def _glob_to_regex(origin: str) -> str:
    return ".*".join(re.escape(part) for part in origin.rstrip("/").split("*"))


def origin_regex(origins: Sequence[str]) -> str:
    """One regex matching every allowed origin (configured globs plus local ones)."""
    patterns = [_glob_to_regex(o) for o in origins if o] + list(LOCAL_ORIGIN_PATTERNS)
    return "|".join(f"(?:{p})" for p in patterns)


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
FORM_TYPE = "application/x-www-form-urlencoded"


def host_name(host_header: str) -> str:
    """The name in a Host header, without port or IPv6 brackets, lower case."""
    text = host_header.strip().lower()
    if text.startswith("["):
        return text[1:text.find("]")] if "]" in text else text[1:]
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def _origin_host(origin: str) -> str:
    rest = origin.split("://", 1)[-1]
    return host_name(rest.split("/", 1)[0])


def host_allowed(name: str, bound: Sequence[str], settings: Settings) -> bool:
    """Whether a request naming `name` in Host may be served (see the module doc).

    `bound` holds the addresses the server is bound to or was reached at.
    """
    if not name or name == "localhost" or name.endswith(".localhost"):
        return True
    ip = _ip(name)
    if ip is not None and ip.is_loopback:
        return True
    bound_names = {host_name(b) for b in bound if b}
    if name in bound_names:
        return True
    if ip is not None and any((b_ip := _ip(b)) is not None and b_ip.is_unspecified for b in bound_names):
        return True
    patterns = list(settings.allowed_hosts) + [_origin_host(o) for o in settings.origins]
    return any(p == "*" or fnmatch.fnmatchcase(name, p.lower()) for p in patterns if p)


def origin_allowed(origin: str, settings: Settings) -> bool:
    if "*" in settings.origins:
        return True
    return re.fullmatch(origin_regex(settings.origins), origin.rstrip("/")) is not None


def media_type(headers: Headers) -> str:
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def is_json_type(kind: str) -> bool:
    return kind in ("", "application/json") or kind.endswith("+json")


def refusal(method: str, headers: Headers, bound: Sequence[str], settings: Settings) -> CorralError | None:
    """Why a request must not be served (Host, Origin, content type), or None."""
    host = host_name(headers.get("host", ""))
    if not host_allowed(host, bound, settings):
        return Forbidden(f"host '{host}' is not allowed; add it to CORRAL_ALLOWED_HOSTS to serve it")
    if method in SAFE_METHODS:
        return None
    origin = headers.get("origin")
    if origin is not None and not origin_allowed(origin, settings):
        return Forbidden(f"origin '{origin}' is not allowed; add it to CORRAL_ORIGINS to serve it")
    kind = media_type(headers)
    if is_json_type(kind) or (kind == FORM_TYPE and origin is None):
        return None
    return UnsupportedMediaType(f"unsupported content type '{kind}': send application/json")


class GuardMiddleware:
    """403 for a disallowed Host or a state-changing request from a disallowed Origin; 415
    for bodies that are not JSON. Outermost of the access checks: nothing runs before it."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        server = scope.get("server") or ("", 0)
        bound = [self.settings.host, str(server[0] or "")]
        error = refusal(scope.get("method", "GET"), Headers(scope=scope), bound, self.settings)
        if error is None:
            await self.app(scope, receive, send)
            return
        await error_response(error, family_for_path(scope.get("path", "")))(scope, receive, send)


def presented_key(headers: Headers, anthropic: bool) -> str | None:
    auth = headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if anthropic:
        return headers.get("x-api-key")
    return None


def key_matches(given: str | None, expected: str) -> bool:
    # Constant time, so the key cannot be guessed byte by byte from response timings.
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class ApiKeyMiddleware:
    """401 in the family's shape unless the request carries the configured key."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        expected = self.settings.api_key  # read live: a changed key applies at once
        if scope["type"] != "http" or not expected:
            await self.app(scope, receive, send)
            return
        method, path = scope.get("method", "GET"), scope.get("path", "")
        if is_open(method, path) or method == "OPTIONS":
            await self.app(scope, receive, send)
            return
        family = family_for_path(path)
        given = presented_key(Headers(scope=scope), anthropic=family == "anthropic")
        if key_matches(given, expected):
            await self.app(scope, receive, send)
            return
        message = "invalid API key" if given else (
            "missing API key: send 'Authorization: Bearer <key>'"
            + (" or 'x-api-key: <key>'" if family == "anthropic" else ""))
        response = error_response(Unauthorized(message), family)
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


def middleware(settings: Settings) -> list[Middleware]:
    """The guard first (nothing from a rebinding name or a foreign page runs), then CORS
    (preflights never need the key; 401s still carry CORS headers), then the key."""
    allow_all = "*" in settings.origins
    cors = Middleware(
        CORSMiddleware,
        allow_origins=["*"] if allow_all else [],
        allow_origin_regex=None if allow_all else origin_regex(settings.origins),
        allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
        allow_headers=["*"],
        expose_headers=["Retry-After"],
        max_age=600,
    )
    return [Middleware(GuardMiddleware, settings=settings), cors,
            Middleware(ApiKeyMiddleware, settings=settings)]
