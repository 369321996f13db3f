"""Embeddings: Ollama's /api/embed and /api/embeddings, OpenAI's /v1/embeddings.

All three lease the model from the scheduler like generation does (same
pull-on-demand of a missing model, loading, fitting, eviction, keep_alive and
the num_ctx stored by /api/create) and send the inputs to the
runner's /embed route in one request, where they are batched together with
other requests' inputs. The runner answers with each vector's float32 bytes
in base64: no float text is formatted or parsed on that hop, and OpenAI's
base64 encoding_format passes those strings through untouched. Vectors come
back L2-normalized (Ollama's /api/embed behaviour), on every route, the
legacy /api/embeddings included; `dimensions` cuts them to the first N
components and normalizes again.

Only embedding models (Manifest.kind) are accepted: a chat model is a 400
before anything is loaded, as are generate and chat on an embedding model
(supervisor/api/ollama.py).
"""

from __future__ import annotations

import array
import base64
import binascii
import sys
import time
from dataclasses import dataclass
from typing import Any

import anyio
from corral.runner.embed_spec import KIND_EMBEDDING
from corral.supervisor.api import completion
from corral.supervisor.api.context import AppContext
from corral.supervisor.api.fields import bool_field, keep_alive_field, model_field, read_json
from corral.supervisor.errors import BadRequest, RunnerFailed
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

MAX_NUM_CTX = 10_000_000


@dataclass(frozen=True)
class Embedded:
    encoded: list[str]  # each vector as the runner sends it: base64 of its float32 little-endian bytes
    prompt_eval_count: int
    load_duration: float  # seconds this request waited for the model to load

    @property
    def embeddings(self) -> list[list[float]]:
        return [_floats(v) for v in self.encoded]


def _floats(encoded: str) -> list[float]:
    """A vector from the base64 of its float32 little-endian bytes (OpenAI's base64 format too)."""
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise RunnerFailed("runner sent a vector that is not base64") from None
    if len(raw) % 4:
        raise RunnerFailed("runner sent a vector whose bytes are not float32s")
    values = array.array("f", raw)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


def not_embedding_message(model: str) -> str:
    return f'"{model}" does not support embeddings'


async def embed_inputs(ctx: AppContext, model: str, inputs: list[Any], *, truncate: bool = True,
                       dimensions: int | None = None, keep_alive: float | None = None,
                       num_ctx: int | None = None) -> Embedded:
    """Resolve, check the model is an embedding model, lease it and embed `inputs`.

    inputs: strings or token id lists. An empty list only loads the model.
    """
    ref = await completion.resolve(ctx, model)  # pulls a missing model, as generation does
    # A loaded model's manifest is at hand; reading it again would cost a thread hop per request.
    manifest = next((m.manifest for m in ctx.scheduler.loaded() if m.name == ref.name), None)
    if manifest is None:
        manifest = await anyio.to_thread.run_sync(ctx.store.manifest, ref)
    if manifest.kind != KIND_EMBEDDING:
        raise BadRequest(not_embedding_message(model), param="model")
    if num_ctx is None:
        num_ctx = completion.stored_num_ctx(ref.defaults)
    async with await ctx.scheduler.acquire(ref, keep_alive=keep_alive, num_ctx=num_ctx) as lease:
        if not inputs:
            return Embedded([], 0, lease.load_duration)
        body: dict[str, Any] = {"input": inputs, "truncate": truncate, "encoding": "base64"}
        if dimensions is not None:
            body["dimensions"] = dimensions
        data = await lease.embed(body)
        encoded = data["embeddings"]
        if len(encoded) != len(inputs) or not all(isinstance(v, str) for v in encoded):
            raise RunnerFailed("runner sent a malformed /embed answer")
        return Embedded(encoded, int(data.get("prompt_eval_count", 0)), lease.load_duration)


# ---- request fields ------------------------------------------------------


def _dimensions(body: dict[str, Any]) -> int | None:
    value = body.get("dimensions")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest("'dimensions' must be a positive integer", param="dimensions")
    return value


def _num_ctx(body: dict[str, Any]) -> int | None:
    options = body.get("options")
    if options is None:
        return None
    if not isinstance(options, dict):
        raise BadRequest("'options' must be an object", param="options")
    value = options.get("num_ctx")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_NUM_CTX:
        raise BadRequest(f"option 'num_ctx' must be an integer between 1 and {MAX_NUM_CTX}", param="options")
    return value


def _ollama_input(body: dict[str, Any]) -> list[str]:
    raw = body.get("input")
    if raw is None:
        return []
    if isinstance(raw, str):
        return [raw] if raw else []  # Ollama: an empty string only loads the model
    if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        return list(raw)
    raise BadRequest("'input' must be a string or a list of strings", param="input")


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _openai_input(body: dict[str, Any]) -> list[Any]:
    """A string, a list of strings, a list of token ids, or a list of such lists."""
    raw = body.get("input")
    bad = BadRequest("'input' must be a string, a list of strings, a list of token ids "
                     "or a list of token id lists", param="input")
    if isinstance(raw, str):
        if not raw:
            raise BadRequest("'input' must not be empty", param="input")
        return [raw]
    if not isinstance(raw, list) or not raw:
        raise bad
    if _is_ids(raw):
        return [raw]
    if all(isinstance(x, str) for x in raw):
        if any(not x for x in raw):
            raise BadRequest("'input' must not contain empty strings", param="input")
        return list(raw)
    if all(_is_ids(x) for x in raw):
        return list(raw)
    raise bad


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


# ---- routes ----------------------------------------------------------------


async def api_embed(request: Request) -> Response:
    started = time.monotonic()
    ctx: AppContext = request.app.state.ctx
    body = await read_json(request)
    model = model_field(body)
    inputs = _ollama_input(body)
    out = await embed_inputs(ctx, model, inputs, truncate=bool_field(body, "truncate", True),
                             dimensions=_dimensions(body), keep_alive=keep_alive_field(body),
                             num_ctx=_num_ctx(body))
    return JSONResponse({
        "model": model,
        "embeddings": out.embeddings,
        "total_duration": _ns(time.monotonic() - started),
        "load_duration": _ns(out.load_duration),
        "prompt_eval_count": out.prompt_eval_count,
    })


async def api_embeddings(request: Request) -> Response:
    """The legacy route: one `prompt` in, one `embedding` out."""
    ctx: AppContext = request.app.state.ctx
    body = await read_json(request)
    model = model_field(body)
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise BadRequest("'prompt' must be a string", param="prompt")
    out = await embed_inputs(ctx, model, [prompt] if prompt else [], keep_alive=keep_alive_field(body),
                             num_ctx=_num_ctx(body))
    return JSONResponse({"embedding": _floats(out.encoded[0]) if out.encoded else []})


async def v1_embeddings(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    body = await read_json(request)
    model = model_field(body)
    inputs = _openai_input(body)
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise BadRequest("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    out = await embed_inputs(ctx, model, inputs, dimensions=_dimensions(body))
    # base64 is OpenAI's float32 little-endian format too: the runner's strings go out as they came.
    vectors: list[Any] = out.encoded if encoding == "base64" else out.embeddings
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
    usage = {"prompt_tokens": out.prompt_eval_count, "total_tokens": out.prompt_eval_count}
    return JSONResponse({"object": "list", "data": data, "model": model, "usage": usage})


def routes(ctx: AppContext) -> list[BaseRoute]:
    return [
        Route("/api/embed", api_embed, methods=["POST"]),
        Route("/api/embeddings", api_embeddings, methods=["POST"]),
        Route("/v1/embeddings", v1_embeddings, methods=["POST"]),
    ]
