"""Observation routes: /metrics (Prometheus text format), and the status snapshot that the
status page (/ui, supervisor.api.ui) and `corral top` show.

Behind the same API key as every other API route (supervisor.api.access).
The snapshot only reads: the scheduler's read-only views (overview, loaded,
queue_depth, standby), the metrics' rings of recent requests and problems,
and the OS's memory figures.
"""

from __future__ import annotations

import time
from typing import Any

from corral.supervisor.api.context import AppContext
from corral.supervisor.metrics import CONTENT_TYPE, ModelGauge, Problem, RequestRecord
from corral.supervisor.scheduler import ModelView
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from corral import supervisor

PROBLEM_SHOWN_FOR = 600.0
"""Seconds a failed load or a stalled runner stays on the status page (unless loaded again)."""


def metrics_text(ctx: AppContext) -> bytes:
    scheduler = ctx.scheduler
    limit, _ = scheduler.memory_limit()
    models = [ModelGauge(m.name, m.size) for m in scheduler.loaded()]
    return scheduler.metrics.render(queue_depth=scheduler.queue_depth(), memory_limit=int(limit),
                                    models=models)


def model_row(v: ModelView) -> dict[str, Any]:
    return {
        "name": v.name, "state": _state(v), "pid": v.pid, "active": v.active, "queued": v.queued,
        "context_length": v.context_length, "num_parallel": v.num_parallel, "expires_at": v.expires_at,
        "pinned": v.pinned, "footprint": v.footprint, "parts": dict(v.parts),
        "prompt_cache_used": v.prompt_cache_used, "error": "",
    }


def _state(v: ModelView) -> str:
    """One word for the table: loading, ready, busy, draining, stopping, or the runner's own state."""
    if v.phase != "loaded":
        return v.phase
    if v.state != "ready":
        return v.state  # e.g. stopping, exited: between its death and the scheduler's drop
    if v.draining:
        return "draining"
    return "busy" if v.active else "ready"


def problem_row(p: Problem) -> dict[str, Any]:
    return {"name": p.model, "state": p.kind, "time": p.at, "error": p.message}


def request_row(at: float, rec: RequestRecord) -> dict[str, Any]:
    generating = rec.duration - (rec.ttft or 0.0)
    tok_s = rec.tokens_out / generating if rec.tokens_out and generating > 0 else None
    return {
        "time": at, "family": rec.family, "route": rec.route, "model": rec.model, "status": rec.status,
        "ttft": rec.ttft, "duration": rec.duration, "tokens_in": rec.tokens_in,
        "tokens_out": rec.tokens_out, "tok_s": tok_s, "error": rec.error,
    }


def _problems(ctx: AppContext, loaded: set[str], now: float) -> list[dict[str, Any]]:
    """Recent problems, newest first, one per model, hiding models loaded since."""
    seen: set[str] = set()
    rows = []
    for p in reversed(ctx.scheduler.metrics.problems):
        if p.model in seen or p.model in loaded or now - p.at > PROBLEM_SHOWN_FOR:
            continue
        seen.add(p.model)
        rows.append(problem_row(p))
    return rows


def memory_picture(ctx: AppContext, models: list[dict[str, Any]]) -> dict[str, Any]:
    scheduler = ctx.scheduler
    limit, source = scheduler.memory_limit()
    standby = scheduler.standby()
    return {
        "limit": int(limit), "limit_source": source, "reserve": int(ctx.settings.reserve),
        "used": sum(m["footprint"] for m in models),
        "os_total": int(scheduler.probe.total()), "os_free": int(scheduler.probe.available()),
        "standby": None if standby is None else {"pid": standby[0], "rss": standby[1]},
    }


def status_snapshot(ctx: AppContext) -> dict[str, Any]:
    """Everything the status page and `corral top` show, as one JSON-able dict."""
    scheduler = ctx.scheduler
    now = time.time()
    models = [model_row(v) for v in scheduler.overview()]
    problems = _problems(ctx, {m["name"] for m in models}, now)
    return {
        "time": now,
        "version": supervisor.__version__,
        "started_at": ctx.started_at,
        "memory": memory_picture(ctx, models),
        "models": models,
        "problems": problems,
        "waiting": scheduler.waiting_for_unloaded(),
        "queue_depth": scheduler.queue_depth(),
        "requests": [request_row(at, rec) for at, rec in reversed(scheduler.metrics.recent)],
    }


def routes(ctx: AppContext) -> list[BaseRoute]:
    async def metrics(request: Request) -> Response:
        return Response(metrics_text(ctx), media_type=CONTENT_TYPE)

    return [Route("/metrics", metrics, methods=["GET"])]
