"""The Anthropic-compatible API: POST /v1/messages and POST /v1/messages/count_tokens.

Request fields, the streaming event sequence and the error object follow
Anthropic's Messages API so the official `anthropic` client works unchanged.
Decisions of ours:

- A model name that is not a local model (SDKs send `claude-*`) is served by
  CORRAL_DEFAULT_MODEL when that is set; otherwise 404 not_found_error.
- Stop sequences are matched by the runner like every other stop string;
  its final line names the one that matched, which becomes stop_reason
  "stop_sequence" with stop_sequence set (usage keeps the runner's counts).
- input_tokens is known only when the runner finishes, so message_start
  carries 0 and message_delta carries the real count (the SDK takes it from
  there).
- tool_use / tool_result blocks and `tools` are passed to the model's chat
  template in the OpenAI-style shape HF templates expect; tool calls that come
  back become tool_use blocks (stop_reason "tool_use"). Images and documents
  are refused with a 400.
- `tool_choice` {type: auto | any | tool | none}: "any" and "tool" force one
  call by constrained decoding (arguments valid against its input_schema);
  "none" hides the tools.
- `keep_alive` (Ollama's duration) is accepted as an extension field.
- count_tokens renders the request with the model's chat template in its
  runner (a completion of zero tokens through the one pipeline), so the count
  is the prompt the model would really read.
- `thinking: {type: enabled, budget_tokens}` turns a thinking model's reasoning on:
  it comes back as a `thinking` content block (signature "") before the text,
  streamed with thinking_delta events. budget_tokens is checked, not enforced.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from corral.runner.protocol import Done, RunnerRequest
from corral.supervisor.api.completion import (
    Collected,
    CompletionRequest,
    Started,
    collect,
    new_id,
    respond,
    sse,
    start,
)
from corral.supervisor.api.context import AppContext
from corral.supervisor.api.errors import anthropic_body, error_response
from corral.supervisor.api.fields import (
    bool_field,
    forced_tool,
    keep_alive_field,
    model_field,
    read_json,
    wire_options,
)
from corral.supervisor.api.toolcalls import calls_from, tool_call_out
from corral.supervisor.errors import BadRequest, CorralError, ModelNotFound
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

# ---- errors ----------------------------------------------------------------


def render_error(exc: CorralError) -> Response:
    return error_response(exc, "anthropic")


def _stream_error(exc: CorralError) -> bytes:
    return sse(anthropic_body(exc), "error")


# ---- request parsing -------------------------------------------------------


def _block_text(block: dict[str, Any], where: str) -> str:
    if block.get("type") == "text" and isinstance(block.get("text"), str):
        return str(block["text"])
    raise BadRequest(f"{where} must be a text block", param="messages")


def _system(body: dict[str, Any]) -> str:
    system = body.get("system")
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    if isinstance(system, list) and all(isinstance(b, dict) for b in system):
        return "\n\n".join(_block_text(b, f"system[{i}]") for i, b in enumerate(system))
    raise BadRequest("'system' must be a string or an array of text blocks", param="system")


def _tool_result_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_block_text(b, f"{where}.content[{j}]") if isinstance(b, dict) else ""
                       for j, b in enumerate(content))
    raise BadRequest(f"{where}.content must be a string or text blocks", param="messages")


def _convert_message(m: Any, i: int) -> list[dict[str, Any]]:
    """One Anthropic message as runner (chat template) messages."""
    where = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
        raise BadRequest(f"{where} must be an object with role 'user' or 'assistant'", param="messages")
    role, content = m["role"], m.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content must be a string or an array of blocks", param="messages")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        bw = f"{where}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(_block_text(block, bw))
        elif kind == "tool_use" and isinstance(block.get("name"), str):
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block["name"], "arguments": block.get("input") or {}}})
        elif kind == "tool_result":
            results.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                            "content": _tool_result_text(block.get("content"), bw)})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # earlier reasoning is not replayed to the model
        elif kind in ("image", "document"):
            raise BadRequest(f"{bw}: '{kind}' blocks are not supported; corral serves text-only models",
                             param="messages")
        else:
            raise BadRequest(f"{bw} has an unsupported block type {kind!r}", param="messages")
    out = list(results)  # tool results answer the previous assistant turn: they come first
    if texts or calls or not results:
        msg: dict[str, Any] = {"role": role, "content": "".join(texts)}
        if calls:
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array", param="messages")
    out: list[dict[str, Any]] = []
    system = _system(body)
    if system:
        out.append({"role": "system", "content": system})
    for i, m in enumerate(messages):
        out.extend(_convert_message(m, i))
    return out


def _tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not tools or (isinstance(choice, dict) and choice.get("type") == "none"):
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                              for t in tools):
        raise BadRequest("'tools' must be an array of {name, description, input_schema}", param="tools")
    return [{"type": "function", "function": {
        "name": t["name"], "description": t.get("description", ""),
        "parameters": t.get("input_schema") or {"type": "object", "properties": {}}}} for t in tools]


def _tool_choice(body: dict[str, Any], tools: list[dict[str, Any]] | None) -> str | None:
    """The runner's tool_choice: None (the model chooses), "required" (any) or a tool's name."""
    choice = body.get("tool_choice")
    if choice is None:
        return None
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind in ("auto", "none"):
        return None
    if kind == "any":
        return forced_tool(tools, None, "tool_choice")
    if kind == "tool" and isinstance(choice.get("name"), str):
        return forced_tool(tools, choice["name"], "tool_choice")
    raise BadRequest("tool_choice: must be {type: auto | any | none} or {type: tool, name}",
                     param="tool_choice")


def _max_tokens(body: dict[str, Any]) -> int:
    value = body.get("max_tokens")
    if value is None:
        raise BadRequest("max_tokens: Field required", param="max_tokens")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest("max_tokens: must be an integer of at least 1", param="max_tokens")
    return value


def _stop_sequences(body: dict[str, Any]) -> list[str]:
    stops = body.get("stop_sequences")
    if stops is None:
        return []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise BadRequest("stop_sequences: must be an array of strings", param="stop_sequences")
    return [s for s in stops if s]


def _options(body: dict[str, Any]) -> dict[str, Any]:
    # Anthropic's defaults: temperature 1, no nucleus/top-k filtering, no repeat penalty.
    raw: dict[str, Any] = {"num_predict": _max_tokens(body), "temperature": 1.0, "top_p": 1.0,
                           "top_k": 0, "repeat_penalty": 1.0, "stop": _stop_sequences(body)}
    for key in ("temperature", "top_p", "top_k"):
        if body.get(key) is not None:
            raw[key] = body[key]
    return wire_options(raw, {"num_predict": "max_tokens", "temperature": "temperature",
                              "top_p": "top_p", "top_k": "top_k", "stop": "stop_sequences"})


def _thinking(body: dict[str, Any]) -> bool | None:
    """`thinking: {type: enabled, budget_tokens}` / `{type: disabled}` as the runner's `think`.

    budget_tokens is checked but, as on Anthropic where it is a target rather than a
    strict limit, the reasoning is bounded by max_tokens only.
    """
    raw = body.get("thinking")
    if raw is None:
        return None
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "disabled":
        return False
    if kind != "enabled":
        raise BadRequest("thinking: must be {type: 'enabled', budget_tokens} or {type: 'disabled'}",
                         param="thinking")
    budget = raw.get("budget_tokens")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise BadRequest("thinking.budget_tokens: must be a positive integer", param="thinking")
    return True


# ---- one request -------------------------------------------------------------


def _resolve_model(ctx: AppContext, name: str) -> str:
    """The local model to serve `name`: itself, else CORRAL_DEFAULT_MODEL, else 404."""
    try:
        ctx.store.resolve(name)
        return name
    except ModelNotFound:
        default = ctx.settings.default_model
        if not default:
            raise ModelNotFound(name, f"model '{name}' not found (set CORRAL_DEFAULT_MODEL to serve "
                                      "other model names with a local model)") from None
        return default


class MessageRequest:
    def __init__(self, ctx: AppContext, body: dict[str, Any]) -> None:
        self.ctx = ctx
        self.model = model_field(body)
        self.stream = bool_field(body, "stream")
        keep_alive = keep_alive_field(body)
        self.tools = _tools(body)
        choice = _tool_choice(body, self.tools)
        self.think = _thinking(body)
        runner = RunnerRequest(_options(body), messages=_messages(body), tools=self.tools,
                               tool_choice=choice, think=self.think)
        given = {"num_predict", *(k for k in ("temperature", "top_p", "top_k") if body.get(k) is not None)}
        if body.get("stop_sequences"):
            given.add("stop")
        self.request = CompletionRequest(self.model, runner, keep_alive=keep_alive,
                                         options_set=frozenset(given))
        self.id = new_id("msg_")

    async def respond(self) -> Response:
        request = replace(self.request, model=_resolve_model(self.ctx, self.model))
        return await respond(self.ctx, request, stream=self.stream, render_stream=self._stream,
                             render_body=self._collected, stream_error=_stream_error,
                             where="Anthropic stream")

    def _calls(self, text: str, done: Done) -> tuple[str, list[dict[str, Any]]]:
        text, raw = calls_from(text, done, tools_given=bool(self.tools))
        blocks = []
        for call in raw:
            parsed = tool_call_out(call)
            if parsed is not None:
                name, args = parsed
                blocks.append({"type": "tool_use", "id": new_id("toolu_"), "name": name,
                               "input": args if isinstance(args, dict) else {"value": args}})
        return text, blocks

    @staticmethod
    def _stop_reason(done: Done, calls: bool) -> str:
        if done.stop_sequence is not None:
            return "stop_sequence"
        if calls:
            return "tool_use"
        return "max_tokens" if done.done_reason == "length" else "end_turn"

    @staticmethod
    def _usage(done: Done) -> dict[str, int]:
        return {"input_tokens": done.prompt_eval_count, "output_tokens": done.eval_count}

    def _message(self, content: list[dict[str, Any]], usage: dict[str, int],
                 stop_reason: str | None, stop_sequence: str | None) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
                "usage": usage}

    def _collected(self, answer: Collected) -> dict[str, Any]:
        done = answer.done
        text, calls = self._calls(answer.text, done)
        content: list[dict[str, Any]] = []
        if self.think:
            content.append({"type": "thinking", "thinking": answer.thinking, "signature": ""})
        if text or not calls:
            content.append({"type": "text", "text": text})
        content.extend(calls)
        return self._message(content, self._usage(done), self._stop_reason(done, bool(calls)),
                             done.stop_sequence)

    async def _stream(self, events: Started) -> AsyncIterator[bytes]:
        held = ""  # with tools, text waits until we know whether it is a tool call
        start = self._message([], {"input_tokens": 0, "output_tokens": 0}, None, None)
        yield sse({"type": "message_start", "message": start}, "message_start")
        # with thinking on, block 0 is the reasoning and the text follows it at index 1
        block = _Blocks(thinking=bool(self.think))
        yield block.open_first()
        yield sse({"type": "ping"}, "ping")
        async for event in events:
            if isinstance(event, Done):
                for piece in self._finish(held, event, block):
                    yield piece
                return
            if event.thinking:
                yield block.thinking_delta(event.thinking)
            if self.tools:
                held += event.content
            elif event.content:
                for piece in block.to_text():
                    yield piece
                yield self._text_delta(event.content, block.index)

    def _finish(self, held: str, done: Done, block: _Blocks) -> list[bytes]:
        out: list[bytes] = list(block.to_text())
        calls: list[dict[str, Any]] = []
        if self.tools:
            held, calls = self._calls(held, done)
            if held:
                out.append(self._text_delta(held, block.index))
        out.append(sse({"type": "content_block_stop", "index": block.index}, "content_block_stop"))
        for index, call in enumerate(calls, start=block.index + 1):
            out.extend(self._tool_use_events(index, call))
        out.append(sse({"type": "message_delta",
                        "delta": {"stop_reason": self._stop_reason(done, bool(calls)),
                                  "stop_sequence": done.stop_sequence},
                        "usage": self._usage(done)}, "message_delta"))
        out.append(sse({"type": "message_stop"}, "message_stop"))
        return out

    @staticmethod
    def _text_delta(text: str, index: int = 0) -> bytes:
        return sse({"type": "content_block_delta", "index": index,
                    "delta": {"type": "text_delta", "text": text}}, "content_block_delta")

    @staticmethod
    def _tool_use_events(index: int, call: dict[str, Any]) -> list[bytes]:
        start = {"type": "tool_use", "id": call["id"], "name": call["name"], "input": {}}
        return [
            sse({"type": "content_block_start", "index": index, "content_block": start},
                "content_block_start"),
            sse({"type": "content_block_delta", "index": index,
                 "delta": {"type": "input_json_delta", "partial_json": json.dumps(call["input"])}},
                "content_block_delta"),
            sse({"type": "content_block_stop", "index": index}, "content_block_stop"),
        ]


class _Blocks:
    """Which content block a stream is in: an optional thinking block, then the text block."""

    def __init__(self, *, thinking: bool) -> None:
        self.index = 0
        self.in_thinking = thinking

    def open_first(self) -> bytes:
        first = ({"type": "thinking", "thinking": "", "signature": ""} if self.in_thinking
                 else {"type": "text", "text": ""})
        return sse({"type": "content_block_start", "index": 0, "content_block": first},
                   "content_block_start")

    def thinking_delta(self, text: str) -> bytes:
        return sse({"type": "content_block_delta", "index": self.index,
                    "delta": {"type": "thinking_delta", "thinking": text}}, "content_block_delta")

    def to_text(self) -> list[bytes]:
        """Close the thinking block (if open) and open the text block."""
        if not self.in_thinking:
            return []
        self.in_thinking = False
        self.index += 1
        return [
            sse({"type": "content_block_delta", "index": 0,
                 "delta": {"type": "signature_delta", "signature": ""}}, "content_block_delta"),
            sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            sse({"type": "content_block_start", "index": self.index,
                 "content_block": {"type": "text", "text": ""}}, "content_block_start"),
        ]


# ---- handlers ----------------------------------------------------------------


async def messages(request: Request) -> Response:
    try:
        body = await read_json(request)
        ctx: AppContext = request.app.state.ctx
        return await MessageRequest(ctx, body).respond()
    except CorralError as e:
        return render_error(e)


async def count_tokens(request: Request) -> Response:
    try:
        body = await read_json(request)
        ctx: AppContext = request.app.state.ctx
        model = _resolve_model(ctx, model_field(body))
        # num_predict 0: the runner renders and counts the prompt, then stops before decoding.
        runner = RunnerRequest(wire_options({"num_predict": 0}, {}), messages=_messages(body),
                               tools=_tools(body))
        answer = await collect(await start(ctx, CompletionRequest(model, runner)))
        return JSONResponse({"input_tokens": answer.done.prompt_eval_count})
    except CorralError as e:
        return render_error(e)


def routes(ctx: AppContext) -> list[BaseRoute]:
    return [Route("/v1/messages", messages, methods=["POST"]),
            Route("/v1/messages/count_tokens", count_tokens, methods=["POST"])]
