"""Model management routes: POST /api/pull and POST /api/create (Ollama's shapes).

/api/pull streams Ollama's progress lines as NDJSON by default; with
"stream": false it answers once, {"status": "success"}, when done. Failures
found before the stream starts (bad name, unknown repo, not an MLX model) are
HTTP errors {"error": ...}; a failure during the download is an error line.

/api/create registers a local directory under a name: {"model": NAME,
"from": DIR}; the store checks the directory loads as an MLX model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from corral.supervisor import pull as pulling
from corral.supervisor.api.context import AppContext
from corral.supervisor.api.fields import model_field, read_json
from corral.supervisor.errors import BadRequest, CorralError
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
    events_iter = await pulling.start_pull(pulling.hub_cache_dir(ctx), name)
    return StreamingResponse(_ndjson(events_iter, str(name)), media_type=NDJSON)


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
    source = body.get("from")
    if not isinstance(source, str) or not source.strip():
        if body.get("modelfile") is not None or body.get("files") is not None:
            raise BadRequest("only {\"model\": NAME, \"from\": DIRECTORY} is supported: "
                             "Modelfiles and blob uploads are not", param="from")
        raise BadRequest("missing 'from': the directory of an MLX model to register", param="from")
    if len(source) > MAX_PATH_CHARS or "\x00" in source:
        raise BadRequest(f"'from' must be a directory path of at most {MAX_PATH_CHARS} characters",
                         param="from")
    path = Path(source).expanduser()
    if not path.is_absolute():
        raise BadRequest(f"'from' must be an absolute directory path, got '{source}'", param="from")
    if not await anyio.to_thread.run_sync(_allowed_dir, path, model_roots(ctx)):
        # One text for "not there" and "not allowed": the answer must not tell which paths exist.
        raise BadRequest(f"'from': no such directory under the model roots (CORRAL_MODELS_DIRS): {source}",
                         param="from")
    try:
        ref = await anyio.to_thread.run_sync(ctx.store.register, name, path)
    except CorralError:
        raise
    except ValueError as e:  # ManifestError: not a loadable model
        raise BadRequest(f"'{source}' is not an MLX model: {e}", param="from") from None
    except OSError as e:  # unreadable files inside the directory
        raise BadRequest(f"'{source}' cannot be read: {e.strerror or e}", param="from") from None
    stream = body.get("stream", True)
    done = {"status": "success", "model": ref.name}
    if stream is False:
        return JSONResponse(done)
    lines = [{"status": "parsing model directory"}, {"status": "writing manifest"}, done]
    return Response("".join(json.dumps(x) + "\n" for x in lines), media_type=NDJSON)


def routes(ctx: AppContext) -> list[BaseRoute]:
    return [
        Route("/api/pull", pull, methods=["POST"]),
        Route("/api/create", create, methods=["POST"]),
    ]

