"""Observation routes: /metrics (Prometheus text format).

Behind the same API key as every other API route (supervisor.api.access).
"""

from __future__ import annotations

from corral.supervisor.api.context import AppContext
from corral.supervisor.metrics import CONTENT_TYPE, ModelGauge
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route


def metrics_text(ctx: AppContext) -> bytes:
    scheduler = ctx.scheduler
    limit, _ = scheduler.memory_limit()
    models = [ModelGauge(m.name, m.size) for m in scheduler.loaded()]
    return scheduler.metrics.render(queue_depth=scheduler.queue_depth(), memory_limit=int(limit),
                                    models=models)


def routes(ctx: AppContext) -> list[BaseRoute]:
    async def metrics(request: Request) -> Response:
        return Response(metrics_text(ctx), media_type=CONTENT_TYPE)

    return [Route("/metrics", metrics, methods=["GET"])]
