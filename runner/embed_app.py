"""The embedding runner's HTTP side: RunnerApp's routes plus POST /embed.

/health, /status, /tokenize and /detokenize are the completion runner's; the
route shapes are documented at ROUTE_EMBED in runner/protocol.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from corral.runner.embedding import EmbedEngine, EmbedJob, TooLong
from corral.runner.protocol import ROUTE_EMBED
from corral.runner.routes import BadInput, RunnerApp, _json_object, error
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

MAX_INPUTS = 4096
"""Inputs one request may carry (more is a 400: split the request)."""

ENCODINGS = ("float", "base64")


class EmbedRunnerApp(RunnerApp):
    kind = "embedding"

    def __init__(self, engine: EmbedEngine, *, model_name: str, token: str | None) -> None:
        super().__init__(engine, model_name=model_name, token=token)  # type: ignore[arg-type]
        self.embed_engine = engine
        self.app.router.routes.append(Route(ROUTE_EMBED, self.embed, methods=["POST"]))

    async def completion(self, request: Request) -> Response:
        return error(400, f"{self.model_name} is an embedding model: it does not support generation")

    async def embed(self, request: Request) -> Response:
        if self.draining:
            return error(503, "runner is shutting down")
        if not self.engine.alive:
            return error(503, "embedding thread is not running")
        started = time.perf_counter()
        try:
            body = await _json_object(request)
            truncate = body.get("truncate", True)
            if not isinstance(truncate, bool):
                raise BadInput("'truncate' must be a boolean")
            dimensions = self._dimensions(body.get("dimensions"))
            encoding = body.get("encoding", "float")
            if encoding not in ENCODINGS:
                raise BadInput(f"'encoding' must be one of {', '.join(ENCODINGS)}")
            inputs = self._token_lists(body.get("input"), truncate)
        except (BadInput, TooLong) as e:
            return error(400, str(e))
        loop = asyncio.get_running_loop()
        job = EmbedJob(inputs=inputs, dimensions=dimensions, loop=loop, future=loop.create_future(),
                       encoding=encoding)
        self.streams += 1
        try:
            if inputs:
                self.embed_engine.submit(job)
                vectors = await job.future
            else:
                vectors = []
        except RuntimeError as e:
            return error(500, str(e))
        finally:
            self.streams -= 1
        return JSONResponse({
            "embeddings": vectors,
            "encoding": encoding,
            "prompt_eval_count": sum(len(ids) for ids in inputs),
            "total_duration": int((time.perf_counter() - started) * 1e9),
        })

    def _dimensions(self, value: Any) -> int | None:
        if value is None:
            return None
        full = self.embed_engine.model.dimensions
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= full:
            raise BadInput(f"'dimensions' must be an integer between 1 and {full}")
        return value

    def _token_lists(self, raw: Any, truncate: bool) -> list[list[int]]:
        if not isinstance(raw, list):
            raise BadInput("'input' must be a list of strings or token id lists")
        if len(raw) > MAX_INPUTS:
            raise BadInput(f"'input' holds {len(raw)} items; at most {MAX_INPUTS} per request")
        tok = self.embed_engine.tokenizer
        prefix = self.embed_engine.model.spec.prefix
        texts = {i: prefix + x for i, x in enumerate(raw) if isinstance(x, str)}
        encoded = dict(zip(texts, tok.encode_inputs(list(texts.values()), truncate=truncate), strict=True))
        vocab = tok.get_vocab_size()
        out: list[list[int]] = []
        for i, item in enumerate(raw):
            if i in encoded:
                ids = encoded[i]
            elif isinstance(item, list) and item and all(
                    isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in item):
                ids = self._fit(i, item, truncate)
            else:
                raise BadInput(f"input {i} must be a string or a non-empty list of token ids in [0, {vocab})")
            if not ids:
                raise BadInput(f"input {i} is empty after tokenization")
            out.append(ids)
        return out

    def _fit(self, index: int, ids: list[int], truncate: bool) -> list[int]:
        limit = self.embed_engine.num_ctx
        if len(ids) <= limit:
            return ids
        if not truncate:
            raise TooLong(f"input {index} is {len(ids)} tokens, more than the model's context "
                          f"length ({limit}); set truncate to cut it")
        return ids[:limit]
