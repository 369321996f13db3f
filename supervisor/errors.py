"""The one exception tree of the supervisor, and its HTTP statuses.

Every error a request can meet is a CorralError subclass carrying its HTTP
status. The API layers turn one into their own error shape (Ollama
`{"error": msg}`, OpenAI `{"error": {...}}`, Anthropic `{"type": "error", ...}`)
through `status_of`, so the status for each failure is decided here and only
here.

    CorralError (500)
    ├── BadRequest (400)
    │   └── InvalidModelName (400)      names that could reach outside the store
    ├── Unauthorized (401)
    ├── Forbidden (403)                 Host or Origin not allowed
    ├── ModelNotFound (404)
    ├── Conflict (409)
    ├── PayloadTooLarge (413)
    ├── UnsupportedMediaType (415)      a body that is not JSON
    ├── Busy (503, Retry-After)         queue full, server shutting down
    │   └── LoadTimeout (503)
    ├── NotSupported (501)              a route of Ollama's, OpenAI's or Anthropic's API corral does not serve
    ├── InsufficientMemory (507)        the model can never fit
    ├── RunnerFailed (500)              runner exited or failed to load; carries its last log line
    └── PullFailed (400/404/502)        see supervisor.pull
"""

from __future__ import annotations


class CorralError(Exception):
    """Base of every error the API can report. `status` is the HTTP status."""

    status: int = 500
    # Anthropic's and OpenAI's error "type" strings for this class.
    anthropic_type: str = "api_error"
    openai_type: str = "server_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(CorralError):
    status = 400
    anthropic_type = "invalid_request_error"
    openai_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidModelName(BadRequest):
    """A model name that is empty, too long, or could escape the store."""


class Unauthorized(CorralError):
    status = 401
    anthropic_type = "authentication_error"
    openai_type = "invalid_request_error"


class Forbidden(CorralError):
    status = 403
    anthropic_type = "permission_error"
    openai_type = "invalid_request_error"


class ModelNotFound(CorralError):
    status = 404
    anthropic_type = "not_found_error"
    openai_type = "invalid_request_error"

    def __init__(self, name: str, message: str | None = None) -> None:
        super().__init__(message or f"model '{name}' not found, try pulling it first")
        self.name = name


class Conflict(CorralError):
    status = 409
    anthropic_type = "invalid_request_error"
    openai_type = "invalid_request_error"


class PayloadTooLarge(CorralError):
    status = 413
    anthropic_type = "request_too_large"
    openai_type = "invalid_request_error"


class UnsupportedMediaType(CorralError):
    status = 415
    anthropic_type = "invalid_request_error"
    openai_type = "invalid_request_error"


class Busy(CorralError):
    """Try again later: the queue is full or the server is stopping."""

    status = 503
    anthropic_type = "overloaded_error"
    openai_type = "server_error"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class LoadTimeout(Busy):
    """The runner did not become ready within the load timeout."""


class NotSupported(CorralError):
    """A route another server's API defines and corral does not serve."""

    status = 501
    anthropic_type = "not_found_error"
    openai_type = "invalid_request_error"


class InsufficientMemory(CorralError):
    """The model cannot fit even with every evictable model gone."""

    status = 507
    anthropic_type = "api_error"
    openai_type = "insufficient_memory"


class RunnerFailed(CorralError):
    """A runner failed to load or exited; the message quotes its last log line."""

    status = 500


class PullFailed(CorralError):
    """A pull could not complete; `status` is set per failure."""

    def __init__(self, message: str, *, status: int = 502) -> None:
        super().__init__(message)
        self.status = status


def status_of(exc: BaseException) -> int:
    """The HTTP status for any exception: CorralError's own, else 500."""
    return exc.status if isinstance(exc, CorralError) else 500
