"""The live status page: /ui serves one static HTML file (package data, no build step, no
CDN); the page reads the status snapshot (supervisor.api.status) from these routes:

    GET /ui          the page itself (open: it holds no data, see supervisor.api.access)
    GET /ui/state    the snapshot as JSON (what `corral top` polls)
    GET /ui/events   server-sent events: a snapshot whenever it changes, and at least
                     every HEARTBEAT seconds
    GET /ui/log      ?model=NAME&lines=N: the last lines of that model's runner log

Everything but the page needs the API key when one is set. Browsers cannot put
headers on an EventSource, so the page reads /ui/events with fetch() and an
Authorization header instead. Actions (unload, load, pin) go through the
ordinary APIs (/api/generate, /api/settings). An event stream ends by itself
once the server begins to shut down (AppContext.stopping), so an open page
never holds up the exit.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from corral.supervisor.api.context import AppContext
from corral.supervisor.api.status import status_snapshot
from corral.supervisor.errors import BadRequest
from corral.supervisor.process import runner_log_path
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

HEARTBEAT = 1.0
"""Seconds between snapshots on the event stream when nothing changed."""
POLL = 0.2
"""Seconds between checks for a change on the event stream."""
LOG_LINES = 200
"""Most log lines /ui/log returns."""
LOG_READ_BYTES = 256 * 1024
"""How much of a log's end /ui/log reads (lines longer than this are cut)."""


def page_html() -> str:
    return resources.files("corral.supervisor").joinpath("static/ui.html").read_text(encoding="utf-8")


def _signature(snapshot: dict[str, Any]) -> str:
    """What counts as a change: everything but the clock and the figures that drift by
    themselves (OS free memory, the standby's RSS), which the heartbeat carries."""
    memory = {k: v for k, v in snapshot["memory"].items() if k not in ("os_free", "standby")}
    return json.dumps({**snapshot, "time": 0, "memory": memory}, sort_keys=True, default=str)


async def snapshot_events(ctx: AppContext, request: Request) -> AsyncIterator[bytes]:
    last_sig = ""
    last_sent = 0.0
    while not ctx.stopping and not await request.is_disconnected():
        snapshot = status_snapshot(ctx)
        sig = _signature(snapshot)
        now = time.monotonic()
        if sig != last_sig or now - last_sent >= HEARTBEAT:
            yield f"event: snapshot\ndata: {json.dumps(snapshot, default=str)}\n\n".encode()
            last_sig, last_sent = sig, now
        await asyncio.sleep(POLL)


def tail_lines(path: Any, lines: int) -> list[str]:
    """The last `lines` lines of a file ([] when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - LOG_READ_BYTES))
            data = f.read()
    except OSError:
        return []
    text = data.decode("utf-8", errors="replace").splitlines()
    if size > LOG_READ_BYTES and text:
        text = text[1:]  # the first line read is probably cut
    return text[-lines:] if lines > 0 else []


def _lines_param(raw: str | None) -> int:
    if raw is None:
        return 50
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"lines must be a whole number, not {raw!r}") from None
    return max(0, min(value, LOG_LINES))


def routes(ctx: AppContext) -> list[BaseRoute]:
    async def page(request: Request) -> Response:
        return HTMLResponse(page_html(), headers={"Cache-Control": "no-store"})

    async def state(request: Request) -> Response:
        return JSONResponse(status_snapshot(ctx))

    async def events(request: Request) -> Response:
        return StreamingResponse(snapshot_events(ctx, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def log(request: Request) -> Response:
        model = request.query_params.get("model", "").strip()
        if not model:
            raise BadRequest("model is required: /ui/log?model=NAME")
        lines = _lines_param(request.query_params.get("lines"))
        path = runner_log_path(ctx.settings.home, model)
        found = await asyncio.to_thread(tail_lines, path, lines)
        return JSONResponse({"model": model, "lines": found})

    return [
        Route("/ui", page, methods=["GET"]),
        Route("/ui/state", state, methods=["GET"]),
        Route("/ui/events", events, methods=["GET"]),
        Route("/ui/log", log, methods=["GET"]),
    ]
