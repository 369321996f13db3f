"""The runner's HTTP side: starlette routes over the generation Engine.

Routes and stream shapes follow runner/protocol.py (the runner protocol).
Handlers never touch MLX; tokenization is pure tokenizer work and is safe
outside the generation thread.

The prompt is rendered here, so this is where it is fitted to num_ctx: an
overflowing chat keeps its system messages and drops the oldest others (Ollama's
rule; the last message alone too long is a 400), a raw prompt keeps its newest
tokens, and room is left to answer. With `think`, the chat template's thinking
switch is set and the reasoning is split off (runner.thinking) before any family
sees the text; with `logprobs`, each text line carries its tokens' entries.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import resource
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import psutil
from corral.runner.device import device_facts
from corral.runner.engine import Engine, Event, Sequence
from corral.runner.grammar import (
    GrammarCache,
    GrammarError,
    GrammarProcessor,
    grammar_for,
    tool_markup,
)
from corral.runner.protocol import (
    NDJSON,
    ROUTE_COMPLETION,
    ROUTE_DETOKENIZE,
    ROUTE_HEALTH,
    ROUTE_STATUS,
    ROUTE_TOKENIZE,
    BodyError,
    OptionError,
    check_top_logprobs,
    chunk_line,
    done_line,
    error_line,
    json_object,
    parse_options,
    parse_think,
)
from corral.runner.thinking import OPEN as THINK_OPEN
from corral.runner.thinking import ThinkingSplitter, template_thinks
from corral.runner.tools import ToolCallSplitter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

log = logging.getLogger("runner")


class BadInput(Exception):
    """A request the runner refuses before streaming (HTTP 400)."""


@dataclass(frozen=True)
class _Wanted:
    """A completion body's fields beyond the prompt and the sampling options."""

    think: bool | str | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    truncate: bool = True

    @classmethod
    def of(cls, body: dict[str, Any]) -> _Wanted:
        logprobs, truncate = body.get("logprobs", False), body.get("truncate", True)
        if not isinstance(logprobs, bool) or not isinstance(truncate, bool):
            raise BadInput("'logprobs' and 'truncate' must be true or false")
        return cls(parse_think(body.get("think")), logprobs, check_top_logprobs(body.get("top_logprobs")),
                   truncate)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def peak_rss_bytes() -> int:
    """This process's peak resident set size, in bytes.

    On Linux, VmHWM (the address space's high-water mark) is used rather than
    ru_maxrss: ru_maxrss carries over across fork+exec, so a runner spawned by
    a large parent would report the parent's size as its own peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


def _chunk_bytes(text: str) -> bytes:
    """The line chunk_line(text) stands for, encoding only the string: the hot path."""
    return f'{{"content":{json.dumps(text, ensure_ascii=False)},"done":false}}\n'.encode()


async def _ready_events(seq: Sequence) -> list[Event]:
    """Wait for the next event, then take every one already queued behind it.

    The first token never waits for company; when the client or this loop lags,
    the tokens that piled up meanwhile go out as one line (one write, one
    parse at the other end) instead of one line each.
    """
    events = [await seq.out.get()]
    while not seq.out.empty():
        events.append(seq.out.get_nowait())
    return events


class RunnerApp:
    kind = "completion"  # what /status reports; the embedding runner's subclass says "embedding"

    def __init__(self, engine: Engine, *, model_name: str, token: str | None) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.token = token
        self.draining = False
        self.streams = 0
        self._max_token_bytes: int | None = None
        self.device = "gpu" if mx.default_device() == mx.gpu else "cpu"
        self._proc = psutil.Process()
        self.grammars = GrammarCache(self.tokenizer)
        # more /status fields (a distributed runner adds its ranks)
        self.extra_status: Callable[[], dict[str, Any]] = dict
        self.app = Starlette(
            routes=[
                Route(ROUTE_HEALTH, self.health, methods=["GET"]),
                Route(ROUTE_STATUS, self.status, methods=["GET"]),
                Route(ROUTE_TOKENIZE, self.tokenize, methods=["POST"]),
                Route(ROUTE_DETOKENIZE, self.detokenize, methods=["POST"]),
                Route(ROUTE_COMPLETION, self.completion, methods=["POST"]),
            ],
            exception_handlers={404: self._not_found, 405: self._not_allowed},
        )
        self.app.add_middleware(_Auth, token=token)  # type: ignore[arg-type]

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return error(404, f"no route {request.url.path}")

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return error(405, f"method {request.method} not allowed on {request.url.path}")

    # -- routes -------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        if self.engine.alive and not self.draining:
            return JSONResponse({"status": "ok"})
        return error(503, "runner is shutting down" if self.draining else "generation thread is not running")

    async def status(self, request: Request) -> Response:
        rss = self._proc.memory_info().rss
        return JSONResponse({
            **self.extra_status(),
            "status": "ok" if self.engine.alive and not self.draining else "stopping",
            "model": self.model_name,
            "kind": self.kind,
            "pid": os.getpid(),
            "context_length": self.engine.num_ctx,
            "num_parallel": self.engine.num_parallel,
            "active": self.engine.active_count,
            "queued": self.engine.queued_count,
            "device": self.device,
            "device_facts": device_facts(),  # afresh: `free` changes
            "memory": {
                "active": mx.get_active_memory(),
                "cache": mx.get_cache_memory(),
                "peak": mx.get_peak_memory(),
                "rss": rss,
                "peak_rss": max(rss, peak_rss_bytes()),
            },
            **self._cache_status(),
        })

    def _cache_status(self) -> dict[str, Any]:
        cache = getattr(self.engine, "prompt_cache", None)
        if cache is None:
            return {}
        stats = cache.stats
        return {"prompt_cache": {
            "budget": cache.max_bytes, "bytes": cache.nbytes, "entries": cache.entries,
            "hits": stats.hits, "misses": stats.misses, "cached_tokens": stats.cached_tokens,
            "disk_bytes": cache.disk_used, "disk_budget": cache.disk_bytes,
            "disk_loaded": stats.disk_loaded, "disk_rejected": stats.disk_rejected,
        }}

    async def tokenize(self, request: Request) -> Response:
        try:
            body = await _json_object(request)
            content = body.get("content")
            if not isinstance(content, str):
                raise BadInput("'content' must be a string")
            add_special = body.get("add_special", False)
            if not isinstance(add_special, bool):
                raise BadInput("'add_special' must be a boolean")
        except BadInput as e:
            return error(400, str(e))
        return JSONResponse({"tokens": self.tokenizer.encode(content, add_special_tokens=add_special)})

    async def detokenize(self, request: Request) -> Response:
        try:
            body = await _json_object(request)
            tokens = body.get("tokens")
            vocab = len(self.tokenizer.get_vocab())
            if not isinstance(tokens, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in tokens
            ):
                raise BadInput(f"'tokens' must be a list of token ids in [0, {vocab})")
        except BadInput as e:
            return error(400, str(e))
        return JSONResponse({"content": self.tokenizer.decode(tokens)})

    async def completion(self, request: Request) -> Response:
        if self.draining:
            return error(503, "runner is shutting down")
        if not self.engine.alive:
            return error(503, "generation thread is not running")
        try:
            body = await _json_object(request)
            options = parse_options(body.get("options"))
            want = _Wanted.of(body)
            self._bound_prompt_bytes(body, want.truncate)
            prompt, tools, opened = self._prompt_tokens(body, want, options.num_predict)
            grammar = await self._grammar(body, tools)
        except (BadInput, OptionError, GrammarError) as e:
            return error(400, str(e))
        room = self.engine.num_ctx - len(prompt)
        if room <= 0:
            return error(400, f"prompt is {len(prompt)} tokens but the context window "
                              f"(num_ctx {self.engine.num_ctx}) fits at most {self.engine.num_ctx - 1}"
                              + ("" if want.truncate else " (truncate is false)"))
        max_tokens = room if options.num_predict < 0 else min(options.num_predict, room)
        if max_tokens == 0:
            return StreamingResponse(iter([_line(done_line(
                "length", prompt_eval_count=len(prompt), prompt_eval_duration=0,
                eval_count=0, eval_duration=0))]), media_type=NDJSON)
        seq = Sequence(prompt=prompt, options=options, max_tokens=max_tokens,
                       loop=asyncio.get_running_loop(), grammar=grammar,
                       top_logprobs=want.top_logprobs if want.logprobs else None)
        # DEBUG: the "request end" line says it all, and each line costs a write here
        # and a read and a write in the supervisor (a tenth of a short request's CPU)
        log.debug("request start: prompt_tokens=%d max_tokens=%d", len(prompt), max_tokens)
        self.engine.submit(seq)
        splitter = ToolCallSplitter(self.tokenizer, tools) if tools else None
        thinking = ThinkingSplitter(opened=opened) if want.think else None
        return StreamingResponse(self._stream(seq, splitter, thinking), media_type=NDJSON)

    # -- helpers ------------------------------------------------------------

    @property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes one vocabulary entry spells (an upper bound per token)."""
        if self._max_token_bytes is None:
            longest = max((len(t.encode("utf-8", "replace")) for t in self.tokenizer.get_vocab()), default=0)
            self._max_token_bytes = max(longest, MIN_TOKEN_BYTES)
        return self._max_token_bytes

    def _bound_prompt_bytes(self, body: dict[str, Any], truncate: bool) -> None:
        """Deal with an over-long prompt by its size alone, before tokenizing it (a 15 MiB
        prompt takes tens of seconds to tokenize): no token spells more than
        max_token_bytes, so a prompt that fits has at most limit = num_ctx *
        max_token_bytes bytes of text. Without truncation a longer one is refused; with
        it, a raw prompt is cut to its last `limit` characters (at least `limit` bytes,
        so at least num_ctx tokens: truncation keeps the same tail)."""
        limit = self.engine.num_ctx * self.max_token_bytes
        prompt = body.get("prompt")
        if truncate:
            if isinstance(prompt, str) and len(prompt) > limit:
                body["prompt"] = prompt[-limit:]
            return
        size = _text_bytes(prompt, limit) + _text_bytes(body.get("messages"), limit)
        if size > limit:
            raise BadInput(f"prompt is over {limit} bytes, more than the context window "
                           f"(num_ctx {self.engine.num_ctx}) can hold (truncate is false)")

    async def _grammar(self, body: dict[str, Any], tools: list[Any] | None) -> GrammarProcessor | None:
        """The request's constraint, compiled off the generation thread (cached by grammar)."""
        fmt, choice = body.get("format"), body.get("tool_choice")
        if choice is not None and not isinstance(choice, str):
            raise BadInput("'tool_choice' must be \"required\" or a tool's name")
        markup = tool_markup(self.tokenizer) if choice is not None else None
        grammar = grammar_for(fmt, choice, tools, *(markup,) if markup else ())
        if grammar is None:
            return None
        return await self.grammars.processor(grammar)

    @property
    def template(self) -> str:
        template = getattr(self.tokenizer, "chat_template", None)
        return template if isinstance(template, str) else ""

    def _prompt_tokens(self, body: dict[str, Any], want: _Wanted,
                       num_predict: int) -> tuple[list[int], list[Any] | None, bool]:
        """The prompt's tokens (truncated to fit when allowed), the tools, and whether
        the prompt already opened a reasoning block."""
        template = body.get("chat_template")
        if template is not None and not isinstance(template, str):
            raise BadInput("'chat_template' must be a string")
        if want.think and not template_thinks(template or self.template):
            raise BadInput(f"{json.dumps(self.model_name)} does not support thinking")
        prompt = body.get("prompt")
        messages = body.get("messages")
        tools = body.get("tools")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise BadInput("'prompt' must be a string")
            if not prompt:
                raise BadInput("'prompt' is empty")
            tok = self.tokenizer
            # Exactly as mlx_lm.stream_generate tokenizes a string prompt.
            add_special = tok.bos_token is None or not prompt.startswith(tok.bos_token)
            ids = list(tok.encode(prompt, add_special_tokens=add_special))
            return self._fit_tokens(ids, want.truncate, num_predict), None, self._opens_thinking(ids)
        if messages is None:
            raise BadInput("request needs 'prompt' or 'messages'")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise BadInput("'messages' must be a non-empty list of objects")
        if tools is not None and not isinstance(tools, list):
            raise BadInput("'tools' must be a list")
        ids = self._render(messages, tools, want.think, template)
        if len(ids) >= self.engine.num_ctx and want.truncate:
            ids = self._fit_messages(messages, tools, want.think, template, self._budget(num_predict))
        return ids, tools or None, self._opens_thinking(ids) if want.think else False

    def _render(self, messages: list[dict[str, Any]], tools: list[Any] | None,
                think: bool | str | None, template: str | None) -> list[int]:
        # The template's thinking switch: Qwen3's enable_thinking, and the effort
        # level for templates that read one; templates without them ignore both.
        extra: dict[str, Any] = {}
        if think is not None:
            extra["enable_thinking"] = bool(think)
            if isinstance(think, str):
                extra["reasoning_effort"] = think
        if template:
            extra["chat_template"] = template  # a per-request Jinja template (Ollama's `template`)
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, tools=tools or None, add_generation_prompt=True, **extra)
        except Exception as e:  # template errors (bad roles, missing keys) are the client's
            raise BadInput(f"chat template failed: {e}") from None
        if isinstance(ids, str):
            ids = self.tokenizer.encode(ids, add_special_tokens=False)
        if not ids:
            raise BadInput("the rendered prompt is empty")
        return list(ids)

    def _budget(self, num_predict: int) -> int:
        """How many prompt tokens a truncated prompt may keep: room is left to answer
        (num_predict, else a quarter of the window; never more than half of it)."""
        ctx = self.engine.num_ctx
        answer = num_predict if num_predict > 0 else ctx // 4
        return max(1, ctx - max(1, min(answer, ctx // 2)))

    def _fit_messages(self, messages: list[dict[str, Any]], tools: list[Any] | None,
                      think: bool | str | None, template: str | None, budget: int) -> list[int]:
        """As Ollama does: keep every system message and drop the oldest others until the
        prompt fits; the last message is always kept, and alone too long is a 400."""
        others = [i for i, m in enumerate(messages) if m.get("role") != "system"]
        ids: list[int] = []
        for start in range(1, len(others)):
            dropped = set(others[:start])
            try:
                ids = self._render([m for i, m in enumerate(messages) if i not in dropped], tools, think, template)
            except BadInput:
                continue  # e.g. a template that refuses a conversation opening with a tool answer
            if len(ids) <= budget:
                log.info("prompt truncated: dropped the %d oldest messages", start)
                return ids
        if ids and len(ids) < self.engine.num_ctx:
            return ids  # only the system messages and the last one left: it fits, barely
        raise BadInput(
            f"the last message does not fit: with the system messages it is "
            f"{len(ids) or len(self._render(messages, tools, think, template))} tokens but the context window "
            f"(num_ctx {self.engine.num_ctx}) fits at most {self.engine.num_ctx - 1}")

    def _fit_tokens(self, ids: list[int], truncate: bool, num_predict: int) -> list[int]:
        """A raw prompt that overflows keeps its newest tokens (and its BOS), as Ollama's runner does."""
        if len(ids) < self.engine.num_ctx or not truncate:
            return ids
        budget = self._budget(num_predict)
        bos = getattr(self.tokenizer, "bos_token_id", None)
        head = ids[:1] if bos is not None and ids[0] == bos else []
        log.info("prompt truncated: kept the last %d of %d tokens", budget - len(head), len(ids))
        return head + ids[len(ids) - (budget - len(head)):]

    def _opens_thinking(self, ids: list[int]) -> bool:
        return self.tokenizer.decode(ids[-16:]).rstrip().endswith(THINK_OPEN)

    async def _stream(self, seq: Sequence, splitter: ToolCallSplitter | None,
                      thinking: ThinkingSplitter | None) -> AsyncIterator[bytes]:
        self.streams += 1
        done = False
        logprobs: list[dict[str, Any]] = []  # of tokens whose text is not out yet

        def text_line(text: str, final: bool = False) -> bytes | None:
            """One line for `text` after the thinking and tool-call splits (None: nothing to send)."""
            reasoning = ""
            if thinking is not None:
                reasoning, text = thinking.feed(text)
                if final:
                    more_reasoning, more_text = thinking.flush()
                    reasoning, text = reasoning + more_reasoning, text + more_text
            if splitter is not None and text:
                text = splitter.feed(text)
            if not (text or reasoning or (final and logprobs)):
                return None
            if not (reasoning or logprobs):
                return _chunk_bytes(text)
            line = _line(chunk_line(text, reasoning, logprobs[:]))
            logprobs.clear()
            return line

        try:
            while not done:
                text: list[str] = []  # consecutive ready texts, sent as one line
                for kind, value in await _ready_events(seq):
                    if kind == "logprob":
                        logprobs.append(value)
                    elif kind == "text":
                        text.append(value)
                    else:
                        done = True
                        # one write for the end: each write is a syscall here and a read there
                        yield b"".join(self._end_lines(kind, value, "".join(text), splitter, text_line))
                        text = []
                        break
                if text:
                    out = text_line("".join(text))
                    if out:
                        yield out
        finally:
            self.streams -= 1
            if not done:  # the client went away: free the slot
                log.info("request cancelled by client disconnect")
                self.engine.cancel(seq)

    def _end_lines(self, kind: str, value: Any, text: str, splitter: ToolCallSplitter | None,
                   text_line: Callable[..., bytes | None]) -> list[bytes]:
        """The last lines of a stream: text that arrived with the end, then the done or error line."""
        if kind == "error":
            out = text_line(text) if text else None
            return [*([out] if out else []), _line(error_line(value))]
        out = text_line(text, final=True)
        lines = [out] if out else []
        fields = dict(value)
        line = done_line(fields.pop("done_reason"), **fields)
        if splitter:
            rest, calls = splitter.finish()
            if rest:
                lines.append(_chunk_bytes(rest))
            if calls:
                line["tool_calls"] = calls
        log.info("request end: reason=%s prompt_tokens=%d eval_tokens=%d",
                 value["done_reason"], value["prompt_eval_count"], value["eval_count"])
        return [*lines, _line(line)]

    def cancel_all(self) -> None:
        self.draining = True
        self.engine.cancel_all()


MIN_TOKEN_BYTES = 16
"""Floor of the per-token byte bound (byte-fallback tokens spell one byte as `<0x41>`)."""


def _text_bytes(value: Any, stop_at: int) -> int:
    """UTF-8 bytes of the strings in `value` (nested lists/objects); stops counting past `stop_at`."""
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
    total = 0
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for item in items:
        total += _text_bytes(item, stop_at - total)
        if total > stop_at:
            break
    return total


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        return json_object(await request.body())
    except BodyError as e:
        raise BadInput(str(e)) from None


class _Auth:
    """Bearer-token check on every request when CORRAL_RUNNER_TOKEN is set."""

    def __init__(self, app: Callable[..., Awaitable[None]], token: str | None) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.expected is not None and scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                await error(401, "missing or wrong bearer token")(scope, receive, send)
                return
        await self.app(scope, receive, send)

