"""Access control: the API key and CORS.

When settings.api_key is set, every API route requires it: `Authorization:
Bearer <key>` everywhere, and also `x-api-key` on the Anthropic routes
(/v1/messages, what the anthropic SDK sends). A missing or wrong key is a 401
in the route family's error shape. `GET/HEAD /` and `/api/version` stay open
so health checks and version probes work without the key; CORS preflights
(OPTIONS with Access-Control-Request-Method) are answered before the key is
checked, as browsers send them without credentials.

Allowed browser origins are settings.origins (glob patterns, "*" for any)
plus local ones, as Ollama allows by default: http(s) on localhost,
127.0.0.1, 0.0.0.0 and [::1] on any port, and app://, file://, tauri:// and
vscode-webview:// origins.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Sequence

from corral.supervisor.api.errors import error_response, family_for_path
from corral.supervisor.config import Settings
from corral.supervisor.errors import Unauthorized
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

OPEN_PATHS = frozenset({"/api/version"})
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
    """CORS outermost (preflights never need the key; 401s still carry CORS headers), then the key."""
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
    return [cors, Middleware(ApiKeyMiddleware, settings=settings)]
