"""Error responses in each API family's shape, and which family a path belongs to.

Each official client sees the shape it expects: paths under /v1/messages are
Anthropic's `{"type": "error", "error": {...}}`, other /v1/ paths OpenAI's
`{"error": {message, type, param, code}}`, everything else (/api/*, /)
Ollama's `{"error": msg}`. The status always comes from supervisor.errors.
"""

from __future__ import annotations

from typing import Any, Literal

from corral.supervisor.errors import CorralError, ModelNotFound
from starlette.responses import JSONResponse, Response

Family = Literal["ollama", "openai", "anthropic"]


def family_for_path(path: str) -> Family:
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/v1/"):
        return "openai"
    return "ollama"


def ollama_body(exc: CorralError) -> dict[str, Any]:
    return {"error": exc.message}


def _openai_code(exc: CorralError) -> str | None:
    if isinstance(exc, ModelNotFound):
        return "model_not_found"
    if exc.status == 401:
        return "invalid_api_key"
    return None


def openai_body(exc: CorralError) -> dict[str, Any]:
    return {"error": {"message": exc.message, "type": exc.openai_type,
                      "param": getattr(exc, "param", None), "code": _openai_code(exc)}}


def anthropic_body(exc: CorralError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": exc.anthropic_type, "message": exc.message}}


_BODIES = {"ollama": ollama_body, "openai": openai_body, "anthropic": anthropic_body}


def error_response(exc: CorralError, family: Family) -> Response:
    """The error as `family`'s clients expect it, with its status and headers (Retry-After)."""
    return JSONResponse(_BODIES[family](exc), status_code=exc.status, headers=exc.headers())
