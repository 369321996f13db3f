"""The one completion pipeline every API family runs a generation through.

A family module parses its request into a CompletionRequest and renders the
typed runner stream (runner.protocol's Chunk and Done events) back into its
own shape; everything in between lives here:

- acquire the model, pulling it first when it is not local and the server
  allows pulls of it (CORRAL_ALLOW_PULL);
- apply what `/api/create` stored with the model's name (apply_model_defaults:
  system prompt, conversation prefix, chat template, parameters), request
  values winning over the model's, exactly once for every family;
- start the runner stream and wait for its first event before answering, so a
  failure before the first byte becomes the family's HTTP error instead of a
  200 followed by an error event;
- answer with a stream (failures after the 200 become the family's in-band
  error line or event) or with one body built from the whole text;
- close the runner stream (which cancels the runner's sequence) and release the
  lease when the answer ends, also when the client went away and the request
  task is being cancelled.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
from corral.runner.protocol import Chunk, Done, RunnerRequest
from corral.supervisor import pull
from corral.supervisor.api.context import AppContext
from corral.supervisor.errors import CorralError, ModelNotFound, RunnerFailed
from corral.supervisor.metrics import RequestRecord, request_log_line
from corral.supervisor.scheduler import Lease
from corral.supervisor.store import ModelDefaults, ModelRef
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

log = logging.getLogger("corral")

Event = Chunk | Done

SSE = "text/event-stream"

current_route: ContextVar[str] = ContextVar("corral_route", default="")
"""The request path, set by the app's RouteMiddleware, for the request log and metrics."""


def _family(route: str) -> str:
    if route.startswith("/v1/messages"):
        return "anthropic"
    return "openai" if route.startswith("/v1/") else "ollama"


def record_request(ctx: AppContext, model: str, t0: float, *, status: int, ttft: float | None,
                   done: Done | None, error: str = "") -> None:
    """The one place a completion request is observed: one log line and the metrics."""
    route = current_route.get()
    rec = RequestRecord(family=_family(route), route=route or "-", model=model, status=status, ttft=ttft,
                        duration=time.perf_counter() - t0,
                        tokens_in=done.prompt_eval_count if done else 0,
                        tokens_out=done.eval_count if done else 0, error=error)
    log.info("%s", request_log_line(rec))
    ctx.scheduler.metrics.observe_request(rec)


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """What a family asks of the pipeline: which model, how to hold it, what to run."""

    model: str
    runner: RunnerRequest
    keep_alive: float | None = None  # seconds (< 0 forever); None: the server default
    num_ctx: int | None = None  # None: the server default
    # the option names the client set itself: the model's stored parameters do not override them
    options_set: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class Collected:
    """A whole answer: all the text, the runner's final event, and the load wait;
    the reasoning and the tokens' log-probabilities when the request asked for them."""

    text: str
    done: Done
    load_duration: float  # seconds this request waited for the model to load
    thinking: str = ""
    logprobs: tuple[dict[str, Any], ...] = ()


async def resolve(ctx: AppContext, name: str) -> ModelRef:
    """The model `name` stands for, pulling it once if it is not local and pulls of it are allowed."""
    try:
        return await ctx.scheduler.resolve(name)
    except ModelNotFound:
        if not await pull.pull_if_allowed(ctx, name):
            raise
        return await ctx.scheduler.resolve(name)


async def acquire(ctx: AppContext, name: str, *, keep_alive: float | None = None,
                  num_ctx: int | None = None) -> Lease:
    """A lease on `name` (see resolve), with the model's stored num_ctx unless one is given."""
    ref = await resolve(ctx, name)
    if num_ctx is None:
        num_ctx = stored_num_ctx(ref.defaults)
    return await ctx.scheduler.acquire(ref, keep_alive=keep_alive, num_ctx=num_ctx)


def stored_num_ctx(defaults: ModelDefaults) -> int | None:
    value = defaults.parameters.get("num_ctx")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def apply_model_defaults(request: CompletionRequest, defaults: ModelDefaults) -> CompletionRequest:
    """`request` with what was created with the model's name, as Ollama applies a Modelfile.

    Parameters fill the options the client did not set; the system prompt goes
    first unless the conversation starts with its own; stored messages come
    before the request's (after its system message); a stored template replaces
    the tokenizer's chat template. A raw prompt gets the parameters only.
    """
    runner = request.runner
    options = dict(runner.options)
    for name, value in defaults.parameters.items():
        if name not in ("num_ctx", "num_shards") and name not in request.options_set:  # load-time ones
            options[name] = value
    messages = runner.messages
    if messages is not None:
        own_system = bool(messages) and messages[0].get("role") == "system"
        rest = messages[1:] if own_system else messages
        head = messages[:1] if own_system else []
        if not own_system and defaults.system:
            head = [{"role": "system", "content": defaults.system}]
        messages = [*head, *(dict(m) for m in defaults.messages), *rest]
    template = defaults.template if messages is not None else None
    num_ctx = request.num_ctx if request.num_ctx is not None else stored_num_ctx(defaults)
    return replace(request, num_ctx=num_ctx,
                   runner=replace(runner, options=options, messages=messages,
                                  template=template or runner.template))


class Started:
    """A runner stream whose first event has arrived; iterate it for every event.

    Iteration raises RunnerFailed if the stream ends before its Done event, so
    renderers never see a silently truncated answer.

    close() must run once the answer ends: it is what cancels the runner's
    sequence (if still going) and releases the lease.
    """

    def __init__(self, lease: Lease, stream: AsyncIterator[Event], first: Event, *,
                 ctx: AppContext | None = None, model: str = "", t0: float = 0.0) -> None:
        self.lease = lease
        self._stream = stream
        self._first: Event | None = first
        self._finished = False  # the Done event came: the stream may end now
        self._closed = False
        self._ctx = ctx  # None: not recorded (the request log and metrics)
        self._model = model
        self._t0 = t0
        self._ttft = time.perf_counter() - t0
        self._done: Done | None = None
        self.error = ""  # what ended the stream early, for the request log

    @property
    def load_duration(self) -> float:
        return self.lease.load_duration

    def __aiter__(self) -> Started:
        return self

    async def __anext__(self) -> Event:
        # the first event is handed back once; after that, straight from the runner stream
        first = self._first
        if first is not None:
            self._first = None
            event = first
        else:
            try:
                event = await anext(self._stream)
            except StopAsyncIteration:
                if self._finished:
                    raise
                raise RunnerFailed("the model's stream ended without a final line") from None
        if isinstance(event, Done):
            self._finished = True
            self._done = event
        return event

    async def close(self) -> None:
        """Idempotent: close the runner stream and release the lease, shielded from cancellation."""
        if not self._closed:
            self._closed = True
            try:
                await _abandon(self.lease, self._stream)
            finally:
                if self._ctx is not None:
                    error = self.error or ("" if self._finished else "ended before its final event")
                    record_request(self._ctx, self._model, self._t0, status=200, ttft=self._ttft,
                                   done=self._done, error=error)


async def _abandon(lease: Lease, stream: AsyncIterator[Event]) -> None:
    # Shielded: a client disconnect cancels the request task, and the runner's
    # slot and the lease must still be given back.
    with anyio.CancelScope(shield=True):
        aclose = getattr(stream, "aclose", None)
        try:
            if aclose is not None:
                await aclose()
        finally:
            await lease.release()


async def start(ctx: AppContext, request: CompletionRequest) -> Started:
    """Acquire the model, start the runner stream and wait for its first event.

    Errors up to here (no such model, a runner refusing the request) raise, so
    they become the family's HTTP error; the lease is released on the way out.
    """
    t0 = time.perf_counter()
    try:
        return await _start(ctx, request, t0)
    except CorralError as e:
        record_request(ctx, request.model, t0, status=e.status, ttft=None, done=None, error=e.message)
        raise


async def _start(ctx: AppContext, request: CompletionRequest, t0: float) -> Started:
    ref = await resolve(ctx, request.model)
    request = apply_model_defaults(request, ref.defaults)
    lease = await ctx.scheduler.acquire(ref, keep_alive=request.keep_alive, num_ctx=request.num_ctx)
    stream = lease.completion(request.runner)
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        await _abandon(lease, stream)
        raise RunnerFailed("the model's runner answered with an empty stream") from None
    except BaseException:
        await _abandon(lease, stream)
        raise
    return Started(lease, stream, first, ctx=ctx, model=request.model, t0=t0)


async def collect(started: Started) -> Collected:
    """Read the whole answer up to its Done, then close the stream."""
    parts: list[str] = []
    reasoning: list[str] = []
    logprobs: list[dict[str, Any]] = []
    try:
        async for event in started:
            if isinstance(event, Done):
                return Collected("".join(parts), event, started.load_duration,
                                 "".join(reasoning), tuple(logprobs))
            parts.append(event.content)
            reasoning.append(event.thinking)
            logprobs.extend(event.logprobs)
    finally:
        await started.close()
    raise AssertionError("unreachable: Started raises when the stream ends before Done")


def as_corral_error(exc: Exception, where: str) -> CorralError:
    """Any failure as a CorralError; an unexpected one is logged with its traceback."""
    if isinstance(exc, CorralError):
        return exc
    log.exception("%s failed", where)
    return CorralError(f"internal error: {type(exc).__name__}: {exc}")


async def _guarded(started: Started, body: AsyncIterator[bytes],
                   stream_error: Callable[[CorralError], bytes], where: str) -> AsyncIterator[bytes]:
    try:
        async for piece in body:
            yield piece
    except Exception as e:  # after the 200 went out, an in-band error is all that is left
        error = as_corral_error(e, where)
        started.error = error.message
        yield stream_error(error)
    finally:
        await started.close()


async def respond(
    ctx: AppContext,
    request: CompletionRequest,
    *,
    stream: bool,
    render_stream: Callable[[Started], AsyncIterator[bytes]],
    render_body: Callable[[Collected], dict[str, Any]],
    stream_error: Callable[[CorralError], bytes],
    media_type: str = SSE,
    where: str = "completion",
) -> Response:
    """Run `request` and answer: render_stream's bytes as a streaming response, or
    render_body's object as JSON. `stream_error` renders a failure mid-stream."""
    started = await start(ctx, request)
    if stream:
        body = _guarded(started, render_stream(started), stream_error, where)
        headers = {"Cache-Control": "no-cache"} if media_type == SSE else None
        return _StartedResponse(started, body, media_type=media_type, headers=headers)
    return JSONResponse(render_body(await collect(started)))


class _StartedResponse(StreamingResponse):
    """A streaming answer that closes its runner stream however sending ends: a client
    gone before the first byte means the body generator never ran its own cleanup."""

    def __init__(self, started: Started, body: AsyncIterator[bytes], *, media_type: str,
                 headers: dict[str, str] | None) -> None:
        super().__init__(body, media_type=media_type, headers=headers)
        self._started = started

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._started.close()


# ---- rendering helpers shared by the SSE families (OpenAI, Anthropic) ------


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event; `data` is JSON-encoded unless it is already a string."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()
