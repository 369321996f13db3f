"""Prometheus metrics: one registry per scheduler, served at /metrics.

Requests are recorded in one place, the completion pipeline (observe_request);
loads and evictions in the scheduler's dispatcher (observe_load, observe_eviction).
Gauges that describe the present (queue depth, footprints, the memory limit)
are set from a snapshot when /metrics is scraped, so nothing else writes them.

The status page's history lives here too, in two bounded rings fed by the same
calls: the last requests (observe_request) and the last problems (failed loads,
stalled or crashed runners: observe_problem).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

EVICTION_REASONS = ("memory", "keep_alive", "single-model", "manual", "crash", "reload", "shutdown")
"""Why a runner left: memory (made room for another model), keep_alive (expired),
single-model (CORRAL_SINGLE_MODEL made room), manual (an unload request),
crash (the runner died by itself), reload (another context length was asked for),
shutdown (the server stopped)."""

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One finished completion request, as the request log line and the counters see it."""

    family: str  # ollama, openai, anthropic
    route: str  # the request path
    model: str
    status: int  # HTTP status (200 also when the stream ended in an in-band error)
    ttft: float | None  # seconds to the first event; None when it never came
    duration: float  # seconds, from the request's start to its end
    tokens_in: int
    tokens_out: int
    error: str = ""


@dataclass(frozen=True, slots=True)
class ModelGauge:
    """One loaded model for the per-model gauges."""

    name: str
    footprint: int


RECENT_REQUESTS = 50
"""Requests the status page lists (the newest ones)."""
RECENT_PROBLEMS = 20
"""Problems (failed loads, stalls, crashes) the status page lists."""


STALL_KILL_WINDOW = 60.0
"""Seconds after a stall in which the model's runner exit is the stall's kill, not a crash."""


@dataclass(frozen=True, slots=True)
class Problem:
    """Something that went wrong with a model, for the status page."""

    at: float  # unix time
    model: str
    kind: str  # "failed" (a load failed), "stalled" (killed for no progress), "crashed" (died by itself)
    message: str


class Metrics:
    """Every corral metric, in a registry of its own (several apps can live in one process)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.recent: deque[tuple[float, RequestRecord]] = deque(maxlen=RECENT_REQUESTS)  # (ended at, record)
        self.problems: deque[Problem] = deque(maxlen=RECENT_PROBLEMS)
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("corral_requests", "Completion requests by family, route and status",
                                ["family", "route", "status"], registry=r)
        self.ttft = Histogram("corral_time_to_first_token_seconds", "Seconds to the first event",
                              ["family"], buckets=_LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("corral_request_duration_seconds", "Seconds a completion request took",
                                  ["family"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens_in = Counter("corral_tokens_in", "Prompt tokens evaluated", ["model"], registry=r)
        self.tokens_out = Counter("corral_tokens_out", "Tokens generated", ["model"], registry=r)
        self.loads = Counter("corral_loads", "Runner loads by outcome", ["outcome"], registry=r)
        self.load_seconds = Histogram("corral_load_seconds", "Seconds a runner took to load",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.evictions = Counter("corral_evictions", "Runners stopped, by reason", ["reason"], registry=r)
        self.restarts = Counter("corral_runner_restarts",
                                "Runners that died by themselves (loaded again on the next request)",
                                registry=r)
        self.queue_depth = Gauge("corral_queue_depth", "Requests waiting for a model", registry=r)
        self.memory_limit = Gauge("corral_memory_limit_bytes", "Memory the scheduler fits models into",
                                  registry=r)
        self.footprint = Gauge("corral_model_footprint_bytes", "Footprint of each loaded model",
                               ["model"], registry=r)
        for reason in EVICTION_REASONS:  # every reason shows from the start, at 0
            self.evictions.labels(reason)

    def observe_request(self, rec: RequestRecord) -> None:
        self.recent.append((self.clock(), rec))
        self.requests.labels(rec.family, rec.route, str(rec.status)).inc()
        self.duration.labels(rec.family).observe(rec.duration)
        if rec.ttft is not None:
            self.ttft.labels(rec.family).observe(rec.ttft)
        if rec.model:
            self.tokens_in.labels(rec.model).inc(rec.tokens_in)
            self.tokens_out.labels(rec.model).inc(rec.tokens_out)

    def observe_load(self, seconds: float, ok: bool) -> None:
        self.loads.labels("ok" if ok else "error").inc()
        if ok:
            self.load_seconds.observe(seconds)

    def observe_eviction(self, reason: str) -> None:
        self.evictions.labels(reason).inc()
        if reason == "crash":
            self.restarts.inc()

    def observe_problem(self, model: str, kind: str, message: str) -> None:
        now = self.clock()
        last = next((p for p in reversed(self.problems) if p.model == model), None)
        if kind == "crashed" and last is not None and last.kind == "stalled" and now - last.at < STALL_KILL_WINDOW:
            return  # the exit of the runner the stall check killed: it shows as stalled
        self.problems.append(Problem(now, model, kind, message))

    def render(self, *, queue_depth: int, memory_limit: int, models: Iterable[ModelGauge]) -> bytes:
        """The text exposition, with the present-state gauges set from this snapshot."""
        self.queue_depth.set(queue_depth)
        self.memory_limit.set(memory_limit)
        self.footprint.clear()
        for m in models:
            self.footprint.labels(m.name).set(m.footprint)
        return generate_latest(self.registry)


def request_log_line(rec: RequestRecord) -> str:
    """The supervisor's one log line per completion request."""
    ttft = f"{rec.ttft * 1000:.0f}ms" if rec.ttft is not None else "-"
    line = (f"{rec.family} {rec.route} model={rec.model} status={rec.status} ttft={ttft} "
            f"tokens={rec.tokens_in}/{rec.tokens_out} duration={rec.duration * 1000:.0f}ms")
    return f"{line} error={rec.error!r}" if rec.error else line
