"""The Starlette application: routes of every API family, errors, body limits, lifespan.

Errors are rendered in the shape of the path's API family (supervisor.api.errors);
the status always comes from supervisor.errors. This module imports the API
modules and none of them imports it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from corral.supervisor.api import (
    access,
    anthropic,
    embed,
    manage,
    ollama,
    openai,
    status,
    ui,
    unsupported,
)
from corral.supervisor.api.completion import current_route
from corral.supervisor.api.context import AppContext
from corral.supervisor.api.errors import error_response, family_for_path
from corral.supervisor.errors import CorralError, PayloadTooLarge
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("corral")

MAX_BODY_BYTES = 16 * 1024 * 1024
"""Largest request body accepted; bigger ones get 413 before being read in full."""


class BodyLimitMiddleware:
    """413 for bodies over the limit: by Content-Length up front, else while streaming in."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = PayloadTooLarge(f"request body exceeds {self.limit} bytes")
        try:
            if declared is not None and int(declared) > self.limit:
                response = error_response(too_large, family_for_path(scope.get("path", "")))
                await response(scope, receive, send)
                return
        except ValueError:
            pass
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise too_large
            return message

        await self.app(scope, limited_receive, send)


class RouteMiddleware:
    """Makes the request path known to the completion pipeline (its request log and metrics)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            current_route.set(scope.get("path", ""))
        await self.app(scope, receive, send)


class CatchAllMiddleware:
    """Unknown exceptions become a 500 in the family's shape; the server keeps serving."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as e:
            log.exception("error handling %s %s", scope.get("method"), scope.get("path"))
            if started:
                return  # too late for a status; the client sees the stream end
            if not isinstance(e, CorralError):
                e = CorralError(f"internal error: {type(e).__name__}: {e}")
            await error_response(e, family_for_path(scope.get("path", "")))(scope, receive, send)


async def _corral_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, CorralError)
    if exc.status >= 500:
        log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
    return error_response(exc, family_for_path(request.url.path))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error = CorralError(exc.detail or "error")
    error.status = exc.status_code
    return error_response(error, family_for_path(request.url.path))


def collect_routes(ctx: AppContext) -> list[BaseRoute]:
    # Ollama's last: it owns "/" and its routes never shadow the others'. The
    # routes corral does not serve come after every served one.
    return [*openai.routes(ctx), *anthropic.routes(ctx), *manage.routes(ctx), *embed.routes(ctx),
            *status.routes(ctx), *ui.routes(ctx), *ollama.routes(ctx), *unsupported.routes(ctx)]


def collect_middleware(ctx: AppContext) -> list[Middleware]:
    return [Middleware(RouteMiddleware), Middleware(CatchAllMiddleware), Middleware(BodyLimitMiddleware), *access.middleware(ctx.settings)]


def create_app(ctx: AppContext) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await ctx.scheduler.start()
        try:
            yield
        finally:
            await ctx.scheduler.shutdown()

    app = Starlette(
        routes=collect_routes(ctx),
        middleware=collect_middleware(ctx),
        exception_handlers={CorralError: _corral_error, HTTPException: _http_error},
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    return app
