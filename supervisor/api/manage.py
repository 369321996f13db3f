"""Model management routes: POST /api/pull and POST /api/create (Ollama's shapes).

/api/pull streams Ollama's progress lines as NDJSON by default; with
"stream": false it answers once, {"status": "success"}, when done. Failures
found before the stream starts (bad name, unknown repo, not an MLX model) are
HTTP errors {"error": ...}; a failure during the download is an error line.

/api/create registers a name: {"model": NAME, "from": MODEL_OR_DIR} plus
Ollama's `system`, `template` (a Jinja chat template), `parameters`,
`messages` and `license`, stored with the name and applied at request time
by the completion pipeline. `from` is an existing model's name (its defaults
are inherited) or an absolute directory, which the store checks loads as an
MLX model. Fields corral cannot honour (quantize, adapters, files, ...) are a
400, never a silent success.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from corral.runner.protocol import OPTION_NAMES, OptionError, options_to_wire, parse_options
from corral.supervisor import pull as pulling
from corral.supervisor.api.context import AppContext
from corral.supervisor.api.fields import model_field, optional_str_field, read_json
from corral.supervisor.api.ollama import jinja_template
from corral.supervisor.errors import BadRequest, CorralError, ModelNotFound
from corral.supervisor.store import ModelDefaults
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

log = logging.getLogger("corral")
NDJSON = "application/x-ndjson"
MAX_PATH_CHARS = 4096  # PATH_MAX on Linux; longer cannot name a directory


def _stream_flag(body: dict[str, Any]) -> bool:
    stream = body.get("stream", True)
    if stream is None:
        return True
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", param="stream")
    return stream


async def _ndjson(events: AsyncIterator[dict[str, Any]], repo: str) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            yield (json.dumps(event) + "\n").encode()
    except CorralError as e:
        log.warning("pull of %s failed: %s", repo, e.message)
        yield (json.dumps({"error": e.message}) + "\n").encode()
    except Exception as e:  # the stream has started: report in-band, keep serving
        log.exception("pull of %s failed", repo)
        yield (json.dumps({"error": f"pull failed: {type(e).__name__}: {e}"}) + "\n").encode()


async def pull(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    body = await read_json(request)
    name = model_field(body, "model", "name")
    stream = _stream_flag(body)
    if not stream:
        events = await pulling.pull_model(ctx, name)
        return JSONResponse(events[-1])
    # start_pull checks the repo first, so those failures get real HTTP statuses.
    events_iter = await pulling.start_pull(pulling.hub_cache_dir(ctx), name, pulling.library_of(ctx))
    return StreamingResponse(_ndjson(events_iter, str(name)), media_type=NDJSON)


MAX_NUM_CTX = 10_000_000
MAX_SHARDS = 64
LOAD_PARAMETERS = ("num_ctx", "num_shards")  # parameters that shape the load, not sampling
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
# Ollama /api/create fields corral cannot honour: a 400, never a silent success.
REFUSED_CREATE_FIELDS = {
    "quantize": "quantizing is not supported by corral: pull an already quantized MLX model "
                "(mlx-community publishes 4-bit and 8-bit conversions)",
    "quantization": "quantizing is not supported by corral",
    "adapters": "LoRA adapters are not supported by corral",
    "files": "blob uploads are not supported by corral: 'from' names a model or an MLX model directory",
    "modelfile": "a raw 'modelfile' is not supported: send its fields (from, system, template, "
                 "parameters, messages, license), as `corral create NAME -f Modelfile` does",
    "path": "'path' (a Modelfile on the server) is not supported: send the Modelfile's fields",
    "renderer": "'renderer' is not supported by corral",
    "parser": "'parser' is not supported by corral",
}


def create_parameters(raw: Any) -> dict[str, Any]:
    """Validated Modelfile parameters (Ollama option names) in the runner's wire form."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BadRequest("'parameters' must be an object of option names to values", param="parameters")
    unknown = sorted(k for k in raw if k not in OPTION_NAMES and k not in LOAD_PARAMETERS)
    if unknown:
        raise BadRequest(f"parameter '{unknown[0]}' is not supported by corral (supported: "
                         f"{', '.join(sorted([*OPTION_NAMES, *LOAD_PARAMETERS]))})", param="parameters")
    out: dict[str, Any] = {}
    shards = raw.get("num_shards")
    if shards is not None:  # how many ranks (hosts) the model runs as; see the hosts setting
        if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= MAX_SHARDS:
            raise BadRequest(f"parameter 'num_shards' must be an integer between 1 and {MAX_SHARDS}",
                             param="parameters")
        out["num_shards"] = shards
    num_ctx = raw.get("num_ctx")
    if num_ctx is not None:
        if isinstance(num_ctx, bool) or not isinstance(num_ctx, int) or not 1 <= num_ctx <= MAX_NUM_CTX:
            raise BadRequest(f"parameter 'num_ctx' must be an integer between 1 and {MAX_NUM_CTX}",
                             param="parameters")
        out["num_ctx"] = num_ctx
    options = {k: v for k, v in raw.items() if k not in LOAD_PARAMETERS and v is not None}
    try:
        wire = options_to_wire(parse_options(options))
    except OptionError as e:
        raise BadRequest(f"parameters: {e}", param="parameters") from None
    out.update({k: wire[k] for k in options})
    return out


def create_messages(raw: Any) -> tuple[dict[str, Any], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise BadRequest("'messages' must be a list", param="messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in MESSAGE_ROLES or not isinstance(
                m.get("content", ""), str):
            raise BadRequest(f"messages[{i}] must be {{role: {'|'.join(MESSAGE_ROLES)}, content: string}}",
                             param="messages")
        if m.get("images"):
            raise BadRequest(f"messages[{i}].images: images are not supported by corral", param="messages")
        out.append({"role": m["role"], "content": m.get("content") or ""})
    return tuple(out)


def create_template(body: dict[str, Any]) -> str | None:
    return jinja_template(body)


def create_license(body: dict[str, Any]) -> str | None:
    value = body.get("license")
    if value is None:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    if not isinstance(value, str):
        raise BadRequest("'license' must be a string or a list of strings", param="license")
    return value


def create_defaults(body: dict[str, Any]) -> ModelDefaults:
    """What /api/create stores with the name; BadRequest for anything corral would not honour."""
    for key, why in REFUSED_CREATE_FIELDS.items():
        if body.get(key) not in (None, "", [], {}):
            raise BadRequest(why, param=key)
    return ModelDefaults(system=optional_str_field(body, "system"), template=create_template(body),
                         parameters=create_parameters(body.get("parameters")),
                         messages=create_messages(body.get("messages")), license=create_license(body))


def _is_directory(source: str) -> bool:
    return source.startswith(("/", "~", "./", "../"))


def model_roots(ctx: AppContext) -> list[Path]:
    """Where /api/create may register directories from: settings.models_dirs, else the
    user's home and the Hugging Face cache."""
    return list(ctx.settings.models_dirs) or [Path.home(), pulling.hub_cache_dir(ctx)]


def _allowed_dir(path: Path, roots: list[Path]) -> bool:
    """`path` is a directory inside one of `roots`, symlinks resolved (no escaping through one)."""
    try:
        real = path.resolve()
        if not real.is_dir():
            return False
        for root in roots:
            if real.is_relative_to(root.expanduser().resolve()):
                return True
    except (OSError, ValueError, RuntimeError):  # too long, unreadable parent, a symlink loop
        return False
    return False


async def create(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    body = await read_json(request)
    name = model_field(body, "model", "name")
    stream = _stream_flag(body)
    defaults = create_defaults(body)
    source = body.get("from")
    if not isinstance(source, str) or not source.strip():
        raise BadRequest("missing 'from': the name of a model or the directory of an MLX model",
                         param="from")
    source = source.strip()
    if len(source) > MAX_PATH_CHARS or "\x00" in source:
        raise BadRequest(f"'from' must be a model name or a directory path of at most {MAX_PATH_CHARS} "
                         "characters", param="from")
    if _is_directory(source):
        path = Path(source).expanduser()
        if not path.is_absolute():
            raise BadRequest(f"'from' must be a model name or an absolute directory path, got '{source}'",
                             param="from")
        if not await anyio.to_thread.run_sync(_allowed_dir, path, model_roots(ctx)):
            # One text for "not there" and "not allowed": the answer must not tell which paths exist.
            raise BadRequest(f"'from': no such directory under the model roots (CORRAL_MODELS_DIRS): "
                             f"{source}", param="from")
        try:
            ref = await anyio.to_thread.run_sync(ctx.store.register, name, path, defaults)
        except CorralError:
            raise
        except ValueError as e:  # ManifestError: not a loadable model
            raise BadRequest(f"'{source}' is not an MLX model: {e}", param="from") from None
        except OSError as e:  # unreadable files inside the directory
            raise BadRequest(f"'{source}' cannot be read: {e.strerror or e}", param="from") from None
    else:
        try:
            ref = await anyio.to_thread.run_sync(ctx.store.create, name, source, defaults)
        except ModelNotFound:
            raise ModelNotFound(source, f"'from': model '{source}' not found (give a model name or "
                                        "an absolute directory path)") from None
    # A loaded runner under this name was started with the old defaults' num_ctx: unload it.
    await ctx.scheduler.unload(ref.name)
    done = {"status": "success", "model": ref.name}
    if not stream:
        return JSONResponse(done)
    lines = [{"status": f"using model {ref.parent or source}"}, {"status": "writing manifest"}, done]
    return Response("".join(json.dumps(x) + "\n" for x in lines), media_type=NDJSON)


def routes(ctx: AppContext) -> list[BaseRoute]:
    return [
        Route("/api/pull", pull, methods=["POST"]),
        Route("/api/create", create, methods=["POST"]),
    ]

