"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models.

Field names, SSE chunk shapes and the error object follow OpenAI's API so the
official `openai` client works unchanged. Decisions of ours:

- Models listed are every model present locally (ctx.store.list()), loaded or
  not; a request for one loads it on demand through the scheduler.
- CORRAL_DEFAULT_MODEL does NOT apply here: OpenAI clients name models they
  saw in /v1/models, so an unknown name is a mistake and gets a 404. (The
  Anthropic route maps unknown names, because its SDKs send `claude-*`.)
- `n` other than 1 is refused with a 400 rather than silently ignored.
- `response_format` json_object / json_schema is enforced by constrained
  decoding in the runner (whether or not `strict` is set): the content is one
  JSON object / one value valid against the schema.
- `tool_choice`: "none" hides the tools, "auto" lets the model choose,
  "required" and {"type": "function", "function": {"name"}} force one call
  (grammar-constrained, arguments valid against the tool's parameters).
- `keep_alive` (Ollama's duration) is accepted as an extension field.
- `reasoning_effort` switches a thinking model's reasoning on ("none": off); it comes
  back as message.reasoning_content / delta.reasoning_content.
- Chat `logprobs` + `top_logprobs` and the legacy completions' `logprobs: N` (0-5)
  come from the runner's real log-probabilities, in OpenAI's shapes.
- Tool calls come from the runner's done line (`tool_calls`) or from
  `<tool_call>{json}</tool_call>` blocks in the text (the Hermes/Qwen
  convention, parsed as on the Ollama routes) when `tools` were given.

The generation itself runs through supervisor.api.completion; this module
translates the request and renders the stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from corral.runner.protocol import Done, RunnerRequest
from corral.supervisor.api.completion import (
    Collected,
    CompletionRequest,
    Started,
    new_id,
    respond,
    sse,
)
from corral.supervisor.api.context import AppContext
from corral.supervisor.api.errors import error_response, openai_body
from corral.supervisor.api.fields import (
    bool_field,
    forced_tool,
    keep_alive_field,
    model_field,
    read_json,
    wire_options,
)
from corral.supervisor.api.toolcalls import calls_from, tool_call_out
from corral.supervisor.errors import BadRequest, CorralError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

OWNER = "corral"


def render_error(exc: CorralError) -> Response:
    return error_response(exc, "openai")


def _stream_error(exc: CorralError) -> bytes:
    return sse(openai_body(exc))


# ---- request parsing -------------------------------------------------------

_PARAMS = {
    "num_predict": "max_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed",
    "stop": "stop", "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
}


def _given(body: dict[str, Any]) -> frozenset[str]:
    """The options the client set itself (a model's stored parameters fill the rest)."""
    given = {opt for opt, f in _PARAMS.items() if body.get(f) is not None}
    if body.get("max_completion_tokens") is not None or body.get("max_tokens") is not None:
        given.add("num_predict")
    if body.get("top_k") is not None:
        given.add("top_k")
    return frozenset(given)


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    """OpenAI sampling fields as runner options. OpenAI's defaults (temperature 1,
    top_p 1, no top_k or repeat penalty) replace Ollama's where the client says nothing."""
    n = body.get("n")
    if n is not None and n != 1:
        raise BadRequest("only n=1 is supported: this server returns one choice per request", param="n")
    raw: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repeat_penalty": 1.0}
    params = dict(_PARAMS)
    for key in ("max_completion_tokens", "max_tokens"):
        if body.get(key) is not None:
            raw["num_predict"] = body[key]
            params["num_predict"] = key
            if isinstance(body[key], int) and not isinstance(body[key], bool) and body[key] < 1:
                raise BadRequest(f"'{key}' must be at least 1", param=key)
            break
    for opt, field in _PARAMS.items():
        if opt != "num_predict" and body.get(field) is not None:
            raw[opt] = body[field]
    if body.get("top_k") is not None:  # a common extension (vLLM, llama.cpp)
        raw["top_k"] = body["top_k"]
        params["top_k"] = "top_k"
    return wire_options(raw, params)


def _response_format(body: dict[str, Any]) -> dict[str, Any] | None:
    """The runner's `format` for response_format: None (text), an object, or the given schema."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise BadRequest("response_format json_schema needs json_schema.schema (an object)",
                             param="response_format")
        return schema
    raise BadRequest("'response_format' must be an object with type 'text', 'json_object' or "
                     "'json_schema'", param="response_format")


def _tool_choice(body: dict[str, Any], tools: list[dict[str, Any]] | None) -> str | None:
    """The runner's tool_choice: None (the model chooses), "required" or a function name."""
    choice = body.get("tool_choice")
    if choice is None or choice in ("auto", "none"):
        return None
    if choice == "required":
        return forced_tool(tools, None, "tool_choice")
    fn = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(fn, dict) and isinstance(fn.get("name"), str):
        return forced_tool(tools, fn["name"], "tool_choice")
    raise BadRequest("'tool_choice' must be \"none\", \"auto\", \"required\" or "
                     "{\"type\": \"function\", \"function\": {\"name\": ...}}", param="tool_choice")


def _content_text(content: Any, where: str) -> str:
    """A message's content: a string, or an array of text parts (joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content must be a string or an array of content parts", param="messages")
    texts: list[str] = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise BadRequest(f"{where}.content[{j}] must be an object", param="messages")
        kind = part.get("type")
        if kind in ("text", "input_text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "input_image", "input_audio", "file"):
            raise BadRequest(f"{where}.content[{j}]: '{kind}' parts are not supported; corral serves "
                             "text-only models", param="messages")
        else:
            raise BadRequest(f"{where}.content[{j}] must be a text part", param="messages")
    return "".join(texts)


def _assistant_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise BadRequest(f"{where}.tool_calls must be an array", param="messages")
    out: list[dict[str, Any]] = []
    for call in calls:
        parsed = tool_call_out(call) if isinstance(call, dict) else None
        if parsed is None:
            raise BadRequest(f"{where}.tool_calls entries need function.name", param="messages")
        out.append({"id": call.get("id"), "type": "function",
                    "function": {"name": parsed[0], "arguments": parsed[1]}})
    return out


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array", param="messages")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"{where} must be an object", param="messages")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise BadRequest(f"{where}.role must be one of system, developer, user, assistant, tool",
                             param="messages")
        msg: dict[str, Any] = {"role": role, "content": _content_text(m.get("content"), where)}
        if role == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = _assistant_calls(m["tool_calls"], where)
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out


def _tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if tools is None or tools == [] or body.get("tool_choice") == "none":
        return None
    if not isinstance(tools, list) or not all(
        isinstance(t, dict) and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str) for t in tools
    ):
        raise BadRequest("'tools' must be an array of {type: 'function', function: {name, ...}}",
                         param="tools")
    return tools


def _prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("'prompt' must be a string (or an array of exactly one string)", param="prompt")
    if body.get("suffix"):
        raise BadRequest("'suffix' (fill-in-the-middle) is not supported", param="suffix")
    if body.get("echo"):
        raise BadRequest("'echo' is not supported", param="echo")
    return prompt


# reasoning_effort as the runner's `think`: "none" turns thinking off, "minimal" is our "low"
_EFFORTS: dict[str, bool | str] = {"none": False, "minimal": "low", "low": "low", "medium": "medium",
                                   "high": "high"}


def _reasoning(body: dict[str, Any]) -> bool | str | None:
    effort = body.get("reasoning_effort")
    if effort is None:
        return None
    if not isinstance(effort, str) or effort not in _EFFORTS:
        raise BadRequest(f"'reasoning_effort' must be one of {', '.join(_EFFORTS)}", param="reasoning_effort")
    return _EFFORTS[effort]


def _logprobs(body: dict[str, Any], chat: bool) -> tuple[bool, int]:
    """(report log-probabilities, alternatives per token): chat's logprobs + top_logprobs,
    or the legacy completions' `logprobs: N`."""
    raw = body.get("logprobs")
    if chat:
        wanted = bool_field(body, "logprobs")
        top = body.get("top_logprobs")
        if top is not None and not wanted:
            raise BadRequest("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20):
            raise BadRequest("'top_logprobs' must be an integer between 0 and 20", param="top_logprobs")
        return wanted, top or 0
    if raw is None:
        return False, 0
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= 5:
        raise BadRequest("'logprobs' must be an integer between 0 and 5", param="logprobs")
    return True, raw


def _completion_logprobs(entries: tuple[dict[str, Any], ...] | list[dict[str, Any]],
                         offset: int = 0) -> dict[str, Any]:
    """The legacy completions' logprobs object from the runner's per-token entries."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top_logprobs", [])} for e in entries],
            "text_offset": offsets}


def _include_usage(body: dict[str, Any]) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise BadRequest("'stream_options' must be an object", param="stream_options")
    return bool_field(opts, "include_usage")


def _usage(done: Done) -> dict[str, int]:
    prompt, completion = done.prompt_eval_count, done.eval_count
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish_reason(done: Done, calls: list[dict[str, Any]]) -> str:
    if calls:
        return "tool_calls"
    return "length" if done.done_reason == "length" else "stop"


def _openai_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for call in calls:
        parsed = tool_call_out(call)
        if parsed is None:
            continue
        name, args = parsed
        out.append({"id": new_id("call_"), "type": "function", "function": {
            "name": name, "arguments": args if isinstance(args, str) else json.dumps(args)}})
    return out


# ---- one request -------------------------------------------------------------


class Completion:
    """One /v1/chat/completions (chat=True) or /v1/completions request."""

    def __init__(self, ctx: AppContext, body: dict[str, Any], *, chat: bool) -> None:
        self.ctx = ctx
        self.chat = chat
        self.model = model_field(body)
        self.stream = bool_field(body, "stream")
        self.include_usage = _include_usage(body) if self.stream else False
        keep_alive = keep_alive_field(body)
        fmt = _response_format(body)
        self.tools = _tools(body) if chat else None
        choice = _tool_choice(body, self.tools) if chat else None
        if choice is not None and fmt is not None:
            raise BadRequest("a forced tool call and response_format json cannot be combined",
                             param="tool_choice")
        options = _sampling(body)
        self.logprobs, top = _logprobs(body, chat)
        self.text_offset = 0  # legacy completions' logprobs count characters across chunks
        extras: dict[str, Any] = {"logprobs": self.logprobs, "top_logprobs": top}
        runner = (RunnerRequest(options, messages=_messages(body), tools=self.tools, format=fmt,
                                tool_choice=choice, think=_reasoning(body), **extras) if chat
                  else RunnerRequest(options, prompt=_prompt(body), format=fmt, **extras))
        self.request = CompletionRequest(self.model, runner, keep_alive=keep_alive,
                                         options_set=_given(body))
        self.id = new_id("chatcmpl-" if chat else "cmpl-")
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": OWNER}

    async def respond(self) -> Response:
        return await respond(self.ctx, self.request, stream=self.stream, render_stream=self._stream,
                             render_body=self._result, stream_error=_stream_error, where="OpenAI stream")

    # -- non-streaming

    def _result(self, answer: Collected) -> dict[str, Any]:
        text, done = answer.text, answer.done
        out = self._envelope(self.object)
        if self.chat:
            text, calls = calls_from(text, done, tools_given=bool(self.tools))
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            if answer.thinking:
                message["reasoning_content"] = answer.thinking
            tool_calls = _openai_calls(calls)
            if tool_calls:
                message["tool_calls"] = tool_calls
                message["content"] = text or None
            choice: dict[str, Any] = {"index": 0, "message": message,
                                      "logprobs": self._logprobs_out(answer.logprobs),
                                      "finish_reason": _finish_reason(done, tool_calls)}
        else:
            choice = {"index": 0, "text": text, "logprobs": self._logprobs_out(answer.logprobs),
                      "finish_reason": _finish_reason(done, [])}
        out["choices"] = [choice]
        out["usage"] = _usage(done)
        return out

    def _logprobs_out(self, entries: tuple[dict[str, Any], ...] | list[dict[str, Any]]
                      ) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        if self.chat:
            return {"content": list(entries), "refusal": None}
        out = _completion_logprobs(entries, self.text_offset)
        self.text_offset = (out["text_offset"][-1] + len(out["tokens"][-1])) if entries else self.text_offset
        return out

    # -- streaming

    def _chunk(self, delta: dict[str, Any] | str, finish: str | None = None,
               logprobs: tuple[dict[str, Any], ...] | list[dict[str, Any]] = ()) -> bytes:
        out = self._envelope("chat.completion.chunk" if self.chat else "text_completion")
        lps = self._logprobs_out(logprobs) if logprobs else None
        if self.chat:
            out["choices"] = [{"index": 0, "delta": delta, "logprobs": lps, "finish_reason": finish}]
        else:
            out["choices"] = [{"index": 0, "text": delta, "logprobs": lps, "finish_reason": finish}]
        return sse(out)

    def _text_chunk(self, text: str, logprobs: tuple[dict[str, Any], ...] | list[dict[str, Any]] = ()
                    ) -> bytes:
        return self._chunk({"content": text} if self.chat else text, logprobs=logprobs)

    async def _stream(self, events: Started) -> AsyncIterator[bytes]:
        held = ""  # with tools, text is held back until we know whether it is a tool call
        held_logprobs: list[dict[str, Any]] = []
        if self.chat:
            yield self._chunk({"role": "assistant", "content": "", "refusal": None})
        async for event in events:
            if isinstance(event, Done):
                for chunk in self._finish(held, event, held_logprobs):
                    yield chunk
                yield b"data: [DONE]\n\n"
                return
            if event.thinking and self.chat:
                yield self._chunk({"reasoning_content": event.thinking})
            if self.tools:
                held += event.content
                held_logprobs.extend(event.logprobs)
            elif event.content or event.logprobs:
                yield self._text_chunk(event.content, event.logprobs)

    def _finish(self, held: str, done: Done, held_logprobs: list[dict[str, Any]]) -> list[bytes]:
        chunks: list[bytes] = []
        calls: list[dict[str, Any]] = []
        if self.chat:
            text, raw_calls = calls_from(held, done, tools_given=bool(self.tools))
            calls = _openai_calls(raw_calls)
            if text or held_logprobs:
                chunks.append(self._text_chunk(text, held_logprobs))
            if calls:
                chunks.append(self._chunk({"tool_calls": [
                    {"index": i, **c} for i, c in enumerate(calls)]}))
            chunks.append(self._chunk({}, _finish_reason(done, calls)))
        else:
            chunks.append(self._chunk("", _finish_reason(done, [])))
        if self.include_usage:
            usage = self._envelope("chat.completion.chunk" if self.chat else "text_completion")
            usage["choices"] = []
            usage["usage"] = _usage(done)
            chunks.append(sse(usage))
        return chunks


# ---- handlers ----------------------------------------------------------------


def _ctx(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


async def _guard(request: Request, chat: bool) -> Response:
    try:
        body = await read_json(request)
        return await Completion(_ctx(request), body, chat=chat).respond()
    except CorralError as e:
        return render_error(e)


async def chat_completions(request: Request) -> Response:
    return await _guard(request, chat=True)


async def completions(request: Request) -> Response:
    return await _guard(request, chat=False)


def _model_card(name: str, created: float) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(created), "owned_by": OWNER}


async def list_models(request: Request) -> Response:
    refs = _ctx(request).store.list()
    return JSONResponse({"object": "list", "data": [_model_card(r.name, r.modified_at) for r in refs]})


async def get_model(request: Request) -> Response:
    try:
        ref = _ctx(request).store.resolve(request.path_params["model"])
    except CorralError as e:
        return render_error(e)
    return JSONResponse(_model_card(ref.name, ref.modified_at))


def routes(ctx: AppContext) -> list[BaseRoute]:
    return [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    ]
