"""Routes the Ollama, OpenAI and Anthropic APIs define that corral does not serve.

Each answers 501 in its family's error shape saying it is "not supported by
corral", so a client learns the server lacks a feature instead of reading a
bare "Not Found" as a wrong URL. Paths both OpenAI and Anthropic define
(/v1/files, /v1/models/...) are answered in Anthropic's shape when the
request carries Anthropic's `anthropic-version` header. Embedding routes are
not listed: they belong to the embeddings API.
"""

from __future__ import annotations

from corral.supervisor.api.context import AppContext
from corral.supervisor.api.errors import Family, error_response, family_for_path
from corral.supervisor.errors import NotSupported
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]

# path -> what it is, as the error names it
UNSUPPORTED: dict[str, str] = {
    # Ollama
    "/api/push": "pushing models to a registry",
    "/api/blobs/{digest}": "blob uploads (create models with 'from' a model name or directory)",
    # OpenAI
    "/v1/responses": "the Responses API (use /v1/chat/completions)",
    "/v1/responses/{rest:path}": "the Responses API (use /v1/chat/completions)",
    "/v1/chat/completions/{rest:path}": "stored chat completions",
    "/v1/images/{rest:path}": "image generation",
    "/v1/audio/{rest:path}": "audio",
    "/v1/files": "files",
    "/v1/files/{rest:path}": "files",
    "/v1/uploads": "uploads",
    "/v1/uploads/{rest:path}": "uploads",
    "/v1/fine_tuning/{rest:path}": "fine-tuning",
    "/v1/batches": "batches",
    "/v1/batches/{rest:path}": "batches",
    "/v1/moderations": "moderations",
    "/v1/assistants": "assistants",
    "/v1/assistants/{rest:path}": "assistants",
    "/v1/threads": "threads",
    "/v1/threads/{rest:path}": "threads",
    "/v1/vector_stores": "vector stores",
    "/v1/vector_stores/{rest:path}": "vector stores",
    "/v1/realtime/{rest:path}": "the Realtime API",
    "/v1/evals": "evals",
    "/v1/evals/{rest:path}": "evals",
    "/v1/organization/{rest:path}": "organization administration",
    # Anthropic
    "/v1/messages/batches": "message batches",
    "/v1/messages/batches/{rest:path}": "message batches",
    "/v1/complete": "the legacy Text Completions API (use /v1/messages)",
    "/v1/skills": "skills",
    "/v1/skills/{rest:path}": "skills",
}


def _family(request: Request) -> Family:
    if "anthropic-version" in request.headers:
        return "anthropic"
    return family_for_path(request.url.path)


def _handler(what: str) -> object:
    async def not_supported(request: Request) -> Response:
        error = NotSupported(f"{request.method} {request.url.path}: {what} is not supported by corral")
        return error_response(error, _family(request))

    return not_supported


def routes(ctx: AppContext) -> list[BaseRoute]:
    """Add these after every served route, so none of them shadows one corral serves."""
    return [Route(path, _handler(what), methods=ALL_METHODS)  # type: ignore[arg-type]
            for path, what in UNSUPPORTED.items()]
