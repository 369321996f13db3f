"""The Ollama API: /api/generate, /api/chat, /api/tags, /api/ps, /api/show, ...

Field names and stream shapes follow Ollama's API so its clients work as is.
Decisions of ours:

- /api/generate applies the model's chat template unless `raw` is true (as
  Ollama does): the prompt becomes a user message, `system` a system message,
  and the runner renders them. With `raw` the prompt goes to the model as is.
- Names follow Ollama's rules (`[host/][namespace/]name[:tag]`, any tag,
  case-insensitive); every name is listed with its tag, a Hub repo as
  "org/repo:latest".
- What /api/create stored with a name (system, template, parameters,
  messages, license) is applied by the completion pipeline and reported by
  /api/show; `capabilities` are decided in one function (capabilities()).
- A model kept forever reports expires_at 9999-12-31T23:59:59Z.
- `format` ("json" or a JSON schema) is enforced by constrained decoding in
  the runner: the answer is one JSON value that validates, ending "stop"
  (or "length" when num_predict comes first). A schema keyword it cannot
  enforce is a 400 naming it.
- `images` and `suffix` are not supported: 400, never silently ignored.
- `think` (true/false/"low"/"medium"/"high") switches the chat template's thinking;
  the runner splits the reasoning off into `thinking` (message.thinking on chat),
  streamed as it comes. A truthy `think` on a model whose template cannot think is
  a 400 ("... does not support thinking"), as on Ollama.
- `logprobs` / `top_logprobs` (at most 20) add Ollama's `logprobs` list to each line.
- A prompt over num_ctx is truncated by the runner (system messages kept, oldest
  others dropped); `truncate: false` makes it a 400 instead. An `options.num_ctx`
  other than the loaded model's reloads it once idle (the scheduler's needsReload).
- Tool calls: the runner parses them when the tokenizer knows the model's
  markup (they arrive on its done line); as a fallback, when `tools` are given,
  `<tool_call>{json}</tool_call>` blocks in the text (the Hermes/Qwen
  convention) are parsed here. Both come back as message.tool_calls.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio
import corral.supervisor as supervisor
from corral.runner.embed_spec import KIND_EMBEDDING
from corral.runner.protocol import (
    NDJSON,
    OPTION_NAMES,
    Done,
    OptionError,
    RunnerRequest,
    check_top_logprobs,
    options_to_wire,
    parse_options,
    parse_think,
)
from corral.supervisor.api.completion import Collected, CompletionRequest, Started, acquire, respond
from corral.supervisor.api.context import AppContext
from corral.supervisor.api.errors import ollama_body
from corral.supervisor.api.fields import (
    bool_field,
    format_field,
    keep_alive_field,
    model_field,
    read_json,
    str_field,
)
from corral.supervisor.api.toolcalls import ToolCallFilter, runner_calls
from corral.supervisor.config import apply_patch, settings_to_json
from corral.supervisor.errors import BadRequest, CorralError, ModelNotFound
from corral.supervisor.manifest import Manifest
from corral.supervisor.scheduler import LoadedModel
from corral.supervisor.store import ModelRef, tagged_name
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

FOREVER_RFC3339 = "9999-12-31T23:59:59Z"
# Go template syntax: Ollama's TEMPLATE language, which corral cannot execute.
GO_TEMPLATE = re.compile(r"\{\{-?\s*(\.|range\b|if\s+\.|end\b)")
MAX_NUM_CTX = 10_000_000
ROLES = ("system", "user", "assistant", "tool")


# ---- small helpers -------------------------------------------------------


def rfc3339(ts: float | None = None) -> str:
    moment = datetime.now(timezone.utc) if ts is None else datetime.fromtimestamp(ts, timezone.utc)
    return moment.isoformat().replace("+00:00", "Z")


def tagged(name: str) -> str:
    """Ollama shows every model with a tag."""
    return tagged_name(name)


def _sampling(body: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """Validated runner options and the requested num_ctx (None: the server default)."""
    raw = body.get("options")
    try:
        opts = parse_options(raw)
    except OptionError as e:
        raise BadRequest(str(e), param="options") from None
    num_ctx = raw.get("num_ctx") if isinstance(raw, dict) else None
    if num_ctx is not None and (
        isinstance(num_ctx, bool) or not isinstance(num_ctx, int) or not 1 <= num_ctx <= MAX_NUM_CTX
    ):
        raise BadRequest(f"option 'num_ctx' must be an integer between 1 and {MAX_NUM_CTX}",
                             param="options")
    return options_to_wire(opts), num_ctx


def options_given(raw: Any) -> frozenset[str]:
    """The options a request set itself (the model's stored parameters fill the rest)."""
    if not isinstance(raw, dict):
        return frozenset()
    return frozenset(k for k, v in raw.items() if v is not None and k in OPTION_NAMES)


def jinja_template(body: dict[str, Any]) -> str | None:
    """/api/generate's `template`: a Jinja chat template used for this request (Go templates: 400)."""
    template = str_field(body, "template")
    if template and GO_TEMPLATE.search(template):
        raise BadRequest("'template' is a Go template (Ollama's TEMPLATE language), which corral cannot "
                         "run: give a Jinja chat template as in tokenizer_config.json", param="template")
    return template or None


def _refuse_unsupported(body: dict[str, Any]) -> None:
    if body.get("images"):
        raise BadRequest("images are not supported: corral serves text-only models", param="images")
    if body.get("suffix"):
        raise BadRequest("'suffix' (fill-in-the-middle) is not supported", param="suffix")
    if body.get("shift") is True:
        # corral never slides the window mid-answer: generation ends with "length" at num_ctx.
        raise BadRequest("'shift' (sliding the context window while generating) is not supported; "
                         "generation stops at num_ctx with done_reason 'length'", param="shift")


def _tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise BadRequest("'tools' must be a list of objects", param="tools")
    return tools


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    raw = body.get("messages")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise BadRequest("'messages' must be a list", param="messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object", param="messages")
        role = m.get("role")
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}", param="messages")
        content = m.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string", param="messages")
        if m.get("images"):
            raise BadRequest(f"messages[{i}].images: images are not supported (text-only models)",
                             param="messages")
        msg: dict[str, Any] = {"role": role, "content": content}
        if m.get("tool_calls") is not None:
            if not isinstance(m["tool_calls"], list):
                raise BadRequest(f"messages[{i}].tool_calls must be a list", param="messages")
            msg["tool_calls"] = m["tool_calls"]
        for extra in ("tool_name", "name", "tool_call_id"):
            if isinstance(m.get(extra), str):
                msg[extra] = m[extra]
        out.append(msg)
    return out


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _extras(body: dict[str, Any]) -> dict[str, Any]:
    """`think`, `logprobs`, `top_logprobs` and `truncate` as RunnerRequest fields."""
    try:
        think = parse_think(body.get("think"))
        top = check_top_logprobs(body.get("top_logprobs"))
    except OptionError as e:
        param = "think" if "'think'" in str(e) else "top_logprobs"
        raise BadRequest(str(e), param=param) from None
    return {"think": think, "logprobs": bool_field(body, "logprobs") or top > 0, "top_logprobs": top,
            "truncate": bool_field(body, "truncate", True)}


# ---- generation ----------------------------------------------------------


class Generation:
    """One /api/generate or /api/chat request turned into Ollama lines."""

    def __init__(self, ctx: AppContext, body: dict[str, Any], *, chat: bool) -> None:
        self.started = time.monotonic()
        self.chat = chat
        self.model = model_field(body)
        self.stream = bool_field(body, "stream", True)
        _refuse_unsupported(body)
        keep_alive = keep_alive_field(body)
        options, num_ctx = _sampling(body)
        fmt = format_field(body.get("format"))
        self.tools = _tools(body) if chat else None
        extras = _extras(body)
        self.logprobs = bool(extras["logprobs"])
        if chat:
            messages = _messages(body)
            self.empty = not messages
            runner = RunnerRequest(options, messages=messages, tools=self.tools, format=fmt, **extras)
        else:
            prompt = str_field(body, "prompt")
            system = str_field(body, "system")
            self.empty = prompt == ""
            if body.get("context"):
                raise BadRequest("'context' (Ollama's deprecated token context) is not supported by "
                                 "corral: send the conversation as /api/chat messages", param="context")
            if bool_field(body, "raw", False):
                runner = RunnerRequest(options, prompt=prompt, format=fmt, **extras)
            else:
                turns = [{"role": "system", "content": system}] if system else []
                turns.append({"role": "user", "content": prompt})
                runner = RunnerRequest(options, messages=turns, template=jinja_template(body), format=fmt,
                                       **extras)
        self.request = CompletionRequest(self.model, runner, keep_alive=keep_alive, num_ctx=num_ctx,
                                         options_set=options_given(body.get("options")))
        self.ctx = ctx

    def line(self, content: str, *, done: bool, calls: list[dict[str, Any]] | None = None,
             extra: dict[str, Any] | None = None, thinking: str = "",
             logprobs: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "created_at": rfc3339()}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = calls
            out["message"] = message
        else:
            out["response"] = content
            if thinking:
                out["thinking"] = thinking
        out["done"] = done
        if self.logprobs and (logprobs or not done):
            out["logprobs"] = list(logprobs)
        if extra:
            out.update(extra)
        return out

    def final(self, done: Done, load_duration: float, content: str = "",
              calls: list[dict[str, Any]] | None = None, thinking: str = "",
              logprobs: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
        return self.line(content, done=True, calls=calls, thinking=thinking, logprobs=logprobs, extra={
            "done_reason": done.done_reason,
            "total_duration": _ns(time.monotonic() - self.started),
            "load_duration": _ns(load_duration),
            "prompt_eval_count": done.prompt_eval_count,
            "prompt_eval_duration": done.prompt_eval_duration,
            "eval_count": done.eval_count,
            "eval_duration": done.eval_duration,
        })

    async def load_or_unload(self) -> Response:
        """Empty prompt / messages: load the model (or unload it with keep_alive 0)."""
        if self.request.keep_alive == 0:
            # What is loaded unloads whatever the disk now says (its files may be gone).
            if not await self.ctx.scheduler.unload(self.model):
                ref = self.ctx.store.resolve(self.model)  # 404 for a name that was never there
                await self.ctx.scheduler.unload(ref.name)
            reason = "unload"
        else:
            lease = await acquire(self.ctx, self.model, keep_alive=self.request.keep_alive,
                                  num_ctx=self.request.num_ctx)
            await lease.release()
            reason = "load"
        return JSONResponse(self.line("", done=True, extra={"done_reason": reason}))

    async def refuse_embedding_model(self) -> None:
        """Ollama's 400 for generate/chat on an embedding model, before anything loads."""
        try:
            ref = await self.ctx.scheduler.resolve(self.model)
            manifest = self.ctx.store.manifest_recent(ref)
            if manifest is None:
                manifest = await anyio.to_thread.run_sync(self.ctx.store.manifest, ref)
        except (CorralError, ValueError, OSError):
            return  # unknown or unreadable: acquire reports it as for any model
        if manifest.kind == KIND_EMBEDDING:
            raise BadRequest(f'"{self.model}" does not support {"chat" if self.chat else "generate"}')

    async def respond(self) -> Response:
        await self.refuse_embedding_model()
        if self.empty:
            return await self.load_or_unload()
        return await respond(self.ctx, self.request, stream=self.stream, render_stream=self._stream,
                             render_body=self._collected, stream_error=_stream_error,
                             media_type=NDJSON, where=f"stream for {self.model}")

    async def _stream(self, events: Started) -> AsyncIterator[bytes]:
        tools = ToolCallFilter() if self.tools else None
        async for event in events:
            if isinstance(event, Done):
                text = tools.flush() if tools is not None else ""
                calls = runner_calls(event)
                if text or calls:
                    yield _dump(self.line(text, done=False, calls=calls))
                yield _dump(self.final(event, events.load_duration))
                return
            text, calls = event.content, list[dict[str, Any]]()
            if tools is not None:
                text, calls = tools.feed(text)
            if text or calls or event.thinking or event.logprobs:
                yield _dump(self.line(text, done=False, calls=calls, thinking=event.thinking,
                                      logprobs=event.logprobs))

    def _collected(self, answer: Collected) -> dict[str, Any]:
        text, calls = answer.text, list[dict[str, Any]]()
        if self.tools:
            f = ToolCallFilter()
            text, calls = f.feed(text)
            text += f.flush()
        calls += runner_calls(answer.done)
        return self.final(answer.done, answer.load_duration, text, calls, answer.thinking, answer.logprobs)


def _stream_error(exc: CorralError) -> bytes:
    return _dump(ollama_body(exc))


def _dump(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


async def generate(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    return await Generation(ctx, await read_json(request), chat=False).respond()


async def chat(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    return await Generation(ctx, await read_json(request), chat=True).respond()


# ---- listing and details -------------------------------------------------


def details(manifest: Manifest | None, parent: str = "") -> dict[str, Any]:
    if manifest is None:
        return {"parent_model": parent, "format": "safetensors", "family": "", "families": None,
                "parameter_size": "", "quantization_level": ""}
    return {
        "parent_model": parent,
        "format": "safetensors",
        "family": manifest.family,
        "families": [manifest.family],
        "parameter_size": manifest.parameter_size,
        "quantization_level": manifest.quantization_level,
    }


def _manifest_or_none(ctx: AppContext, ref: ModelRef) -> Manifest | None:
    # One unreadable directory in a big cache must not break the whole listing.
    try:
        return ctx.store.manifest(ref)
    except (ValueError, OSError):
        return None


async def tags(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    models = []
    for ref in await anyio.to_thread.run_sync(ctx.store.list):
        manifest = _manifest_or_none(ctx, ref)
        models.append({
            "name": tagged(ref.name),
            "model": tagged(ref.name),
            "modified_at": rfc3339(ref.modified_at),
            "size": ref.size,
            "digest": ref.digest,
            "details": details(manifest, ref.parent),
        })
    return JSONResponse({"models": models})


def ps_row(m: LoadedModel) -> dict[str, Any]:
    return {
        "name": tagged(m.name),
        "model": tagged(m.name),
        "size": m.size,
        "digest": m.ref.digest,
        "details": details(m.manifest, m.ref.parent),
        "expires_at": FOREVER_RFC3339 if m.expires_at is None else rfc3339(m.expires_at),
        "size_vram": m.size_vram,
        "context_length": m.context_length,
        # ours, beyond Ollama's fields:
        "pid": m.pid,
        "state": m.state,
        "active": m.active,
        "pinned": m.pinned,
        "num_parallel": m.num_parallel,
        # the runner's prompt cache: hits, bytes in memory and on disk (its last /status)
        "prompt_cache": m.prompt_cache,
        # a model spread across hosts: where its ranks run and what each one holds
        **({"hosts": list(m.hosts), "ranks": list(m.ranks)} if m.hosts else {}),
    }


async def ps(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    return JSONResponse({"models": [ps_row(m) for m in ctx.scheduler.loaded()]})


def _read_text(path: Path, limit: int = 1 << 20) -> str | None:
    try:
        with path.open("r", encoding="utf-8", errors="replace") as f:
            return f.read(limit)
    except OSError:
        return None


def _read_json_file(path: Path) -> dict[str, Any]:
    text = _read_text(path, 16 << 20)
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def chat_template(model_dir: Path) -> str:
    """The chat template as shipped: chat_template.jinja, else tokenizer_config.json's."""
    jinja = _read_text(model_dir / "chat_template.jinja")
    if jinja:
        return jinja
    template = _read_json_file(model_dir / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else ""


def license_text(model_dir: Path) -> str | None:
    for name in ("LICENSE", "LICENSE.md", "LICENSE.txt", "LICENCE"):
        text = _read_text(model_dir / name)
        if text is not None:
            return text
    return None


def _param_line(name: str, value: Any) -> str:
    shown = json.dumps(value) if isinstance(value, str) else value
    return f"{name:<15}{shown}"


def parameters_text(model_dir: Path, stored: dict[str, Any] | None = None) -> str:
    """Ollama's `parameters`: one "name value" per line: what /api/create stored, else the
    model's generation_config and eos token."""
    if stored:
        lines: list[str] = []
        for name, value in stored.items():
            values = value if isinstance(value, list) else [value]
            lines.extend(_param_line(name, v) for v in values)
        return "\n".join(lines)
    gen = _read_json_file(model_dir / "generation_config.json")
    tok = _read_json_file(model_dir / "tokenizer_config.json")
    lines = []
    for key in ("temperature", "top_p", "top_k", "repetition_penalty"):
        if isinstance(gen.get(key), (int, float)) and not isinstance(gen.get(key), bool):
            name = "repeat_penalty" if key == "repetition_penalty" else key
            lines.append(f"{name:<15}{gen[key]}")
    eos = tok.get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if isinstance(eos, str) and eos:
        lines.append(_param_line("stop", eos))
    return "\n".join(lines)


# Markers in a chat template or tokenizer that say what the model can do.
_THINKING_MARKERS = ("enable_thinking", "<think>", "reasoning_content", "thinking")
_FIM_MARKERS = ("<|fim_prefix|>", "<fim_prefix>", "<PRE>", "<|fim_begin|>", "<｜fim▁begin｜>")
# corral refuses `suffix` and images with a 400: a model able to fill in the
# middle or read images must not be advertised as such to clients.
NOT_SERVED = frozenset({"insert", "vision"})


def capabilities(model_dir: Path, template: str, kind: str | None = None) -> list[str]:
    """The one place that decides a model's Ollama `capabilities`, from its type and template.

    `kind` is the manifest's model kind where it has one ("embedding" models
    only embed); otherwise a model completes text, with tools / thinking when
    its chat template takes them.
    """
    if kind == KIND_EMBEDDING:
        return ["embedding"]
    found = ["completion"]
    if "tools" in template:
        found.append("tools")
    if any(marker in template for marker in _THINKING_MARKERS):
        found.append("thinking")
    tokenizer_text = _read_text(model_dir / "tokenizer_config.json") or ""
    if any(marker in tokenizer_text for marker in _FIM_MARKERS):
        found.append("insert")
    config = _read_json_file(model_dir / "config.json")
    if "vision_config" in config or (model_dir / "preprocessor_config.json").is_file():
        found.append("vision")
    return [c for c in found if c not in NOT_SERVED]


def model_info(manifest: Manifest, config: dict[str, Any], name: str = "") -> dict[str, Any]:
    """Ollama's `model_info`: `general.*` keys and `<architecture>.*` keys (GGUF's names)."""
    arch = manifest.model_type
    info: dict[str, Any] = {
        "general.architecture": arch,
        "general.parameter_count": manifest.parameter_count,
        "general.file_type": manifest.quantization_level,
        "general.size_label": manifest.parameter_size,
        f"{arch}.context_length": manifest.max_context,
        f"{arch}.block_count": manifest.num_layers,
        f"{arch}.attention.head_count_kv": manifest.kv_heads,
        f"{arch}.attention.key_length": manifest.head_dim,
        f"{arch}.attention.value_length": manifest.head_dim,
    }
    if name:
        info["general.basename"] = name.rsplit("/", 1)[-1].partition(":")[0]
    for key, gguf in (("hidden_size", "embedding_length"), ("num_attention_heads", "attention.head_count"),
                      ("intermediate_size", "feed_forward_length"), ("vocab_size", "vocab_size"),
                      ("rope_theta", "rope.freq_base"),
                      ("rms_norm_eps", "attention.layer_norm_rms_epsilon")):
        if isinstance(config.get(key), (int, float)) and not isinstance(config.get(key), bool):
            info[f"{arch}.{gguf}"] = config[key]
    if manifest.quant_bits:
        info["general.quantization_bits"] = manifest.quant_bits
        info["general.quantization_group_size"] = manifest.quant_group_size
    return info


def _quoted(text: str) -> str:
    return f'"""{text}"""'


def modelfile(ref: ModelRef, template: str, params: str, license: str | None) -> str:
    """The Modelfile that recreates this model with `corral create NAME -f Modelfile`."""
    source = ref.parent or str(ref.path)
    parts = ["# Modelfile generated by corral\n# To build a new model from this one, use:\n"
             "#   corral create NEW_NAME -f Modelfile\n", f"FROM {source}\n"]
    if template:
        parts.append(f"TEMPLATE {_quoted(template)}\n")
    if ref.defaults.system is not None:
        parts.append(f"SYSTEM {_quoted(ref.defaults.system)}\n")
    for line in params.splitlines():
        name, _, value = line.partition(" ")
        parts.append(f"PARAMETER {name} {value.strip()}\n")
    for m in ref.defaults.messages:
        parts.append(f"MESSAGE {m.get('role')} {_quoted(str(m.get('content', '')))}\n")
    if license:
        parts.append(f"LICENSE {_quoted(license)}\n")
    return "".join(parts)


def show_payload(ref: ModelRef, manifest: Manifest) -> dict[str, Any]:
    stored = ref.defaults
    template = stored.template or chat_template(ref.path)
    params = parameters_text(ref.path, stored.parameters)
    lic = stored.license if stored.license is not None else license_text(ref.path)
    config = _read_json_file(ref.path / "config.json")
    out: dict[str, Any] = {
        "modelfile": modelfile(ref, template, params, lic),
        "parameters": params,
        "template": template,
        "details": details(manifest, ref.parent),
        "model_info": model_info(manifest, config, ref.name),
        "capabilities": capabilities(ref.path, template, manifest.kind),
        "modified_at": rfc3339(ref.modified_at),
        "source": ref.source,  # ours: "hf" (the shared Hugging Face cache) or "local" (`corral rm` asks)
    }
    if stored.system is not None:
        out["system"] = stored.system
    if stored.messages:
        out["messages"] = [dict(m) for m in stored.messages]
    if lic is not None:
        out["license"] = lic
    return out


async def show(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    body = await read_json(request)
    ref = ctx.store.resolve(model_field(body, "model", "name"))
    try:
        manifest = ctx.store.manifest(ref)
    except ValueError as e:
        raise BadRequest(f"model '{ref.name}' cannot be read: {e}") from None
    return JSONResponse(await anyio.to_thread.run_sync(show_payload, ref, manifest))


# ---- management ----------------------------------------------------------


async def delete(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    body = await read_json(request)
    name = model_field(body, "model", "name")
    # A loaded model is stopped first, so its runner does not keep files in use; it is
    # stopped even when its files are gone, so a model whose disk vanished can be deleted.
    unloaded = await ctx.scheduler.unload(name)
    try:
        ref = ctx.store.resolve(name)
    except ModelNotFound:
        with contextlib.suppress(ModelNotFound):
            await anyio.to_thread.run_sync(ctx.store.delete, name)  # a registration left dangling
            return Response(status_code=200)
        if unloaded:
            return Response(status_code=200)
        raise
    await ctx.scheduler.unload(ref.name)
    await anyio.to_thread.run_sync(ctx.store.delete, ref.name)
    return Response(status_code=200)


async def copy(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    body = await read_json(request)
    src = model_field(body, "source")
    dst = model_field(body, "destination")
    await anyio.to_thread.run_sync(ctx.store.copy, src, dst)
    return Response(status_code=200)


async def version(request: Request) -> Response:
    return JSONResponse({"version": supervisor.__version__})


async def root(request: Request) -> Response:
    return PlainTextResponse("corral is running")


async def get_settings(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    shown = settings_to_json(ctx.settings)
    # what loads are fitted under now, and why (the setting, the device's report, or RAM)
    shown["memory_limit_effective"], shown["memory_limit_source"] = ctx.scheduler.memory_limit()
    return JSONResponse(shown)


async def patch_settings(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    changed = apply_patch(ctx.settings, await read_json(request))
    return JSONResponse({**settings_to_json(ctx.settings), "changed": changed})


def routes(ctx: AppContext) -> list[BaseRoute]:
    return [
        Route("/", root, methods=["GET", "HEAD"]),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/chat", chat, methods=["POST"]),
        Route("/api/tags", tags, methods=["GET", "HEAD"]),
        Route("/api/ps", ps, methods=["GET"]),
        Route("/api/show", show, methods=["POST"]),
        Route("/api/delete", delete, methods=["DELETE"]),
        Route("/api/copy", copy, methods=["POST"]),
        Route("/api/version", version, methods=["GET", "HEAD"]),
        Route("/api/settings", get_settings, methods=["GET"]),
        Route("/api/settings", patch_settings, methods=["PATCH"]),
    ]
