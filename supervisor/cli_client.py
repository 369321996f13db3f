"""A small synchronous client for corral's HTTP API (what the `corral` CLI talks to).

Two failures matter to a caller and get their own exceptions: the server
cannot be reached (CannotConnect) and the server answered an error
(ServerError, with its status and message, from an HTTP error or an
in-stream {"error": ...} line).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from corral.supervisor.config import DEFAULT_HOST, parse_host

# Wildcard binds and the loopback address a client reaches them on.
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}


class ClientError(Exception):
    """Base for the errors a command reports on one line."""


class CannotConnect(ClientError):
    def __init__(self, url: str) -> None:
        super().__init__(f"could not connect to corral at {url} — is it running? "
                         f"start it with `corral serve`")
        self.url = url


class ServerError(ClientError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def base_url(host: str | None = None) -> str:
    """http://HOST:PORT for CORRAL_HOST's forms ("127.0.0.1:11434", ":8080", "0.0.0.0", a URL).

    The address is read as `corral serve` reads it (config.parse_host), so both
    agree on the defaults; a server bound to every interface is reached on loopback.
    """
    text = (host if host is not None else os.environ.get("CORRAL_HOST", "")).strip() or DEFAULT_HOST
    scheme = text.split("://", 1)[0] if "://" in text else "http"
    try:
        name, port = parse_host(text)
    except ValueError:
        raise ClientError(f"invalid server address {text!r}: use HOST[:PORT]") from None
    name = _LOOPBACK.get(name, name)
    return f"{scheme}://[{name}]:{port}" if ":" in name else f"{scheme}://{name}:{port}"


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or f"HTTP {response.status_code}"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):  # OpenAI/Anthropic shapes
        error = error.get("message")
    return str(error) if error else f"HTTP {response.status_code}"


class CorralClient:
    def __init__(self, host: str | None = None, api_key: str | None = None,
                 timeout: float | None = 600.0) -> None:
        self.url = base_url(host)
        key = api_key if api_key is not None else os.environ.get("CORRAL_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers,
                                  timeout=httpx.Timeout(timeout, connect=5.0))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CorralClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transport(self, failure: str) -> Iterator[None]:
        """httpx's transport failures as ours: CannotConnect, else ServerError(0, failure: why)."""
        try:
            yield
        except (httpx.ConnectError, httpx.ConnectTimeout):
            raise CannotConnect(self.url) from None
        except httpx.HTTPError as e:
            raise ServerError(0, f"{failure}: {e}") from None

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One JSON request; the decoded answer (None for an empty body)."""
        with self._transport(f"request to {self.url}{path} failed"):
            response = self._http.request(method, path, json=body)
        if response.status_code >= 400:
            raise ServerError(response.status_code, _error_message(response))
        if not response.content.strip():
            return None
        try:
            return response.json()
        except ValueError:
            # NDJSON answers (e.g. /api/create) give their last line.
            lines = [ln for ln in response.text.splitlines() if ln.strip()]
            return json.loads(lines[-1]) if lines else None

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST and yield each NDJSON line; an {"error"} line raises ServerError.

        Closing the generator (e.g. on Ctrl-C) closes the connection, which
        the server takes as the client going away and stops generating.
        """
        with self._transport(f"connection to {self.url} broke"), \
                self._http.stream("POST", path, json=body) as response:
            if response.status_code >= 400:
                response.read()
                raise ServerError(response.status_code, _error_message(response))
            for line in response.iter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                if isinstance(event, dict) and event.get("error"):
                    raise ServerError(response.status_code, str(event["error"]))
                yield event

    # ---- the API, by name ----

    def version(self) -> str:
        return str(self.request("GET", "/api/version")["version"])

    def tags(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/api/tags")["models"])

    def ps(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/api/ps")["models"])

    def show(self, model: str) -> dict[str, Any]:
        return dict(self.request("POST", "/api/show", {"model": model}))

    def delete(self, model: str) -> None:
        self.request("DELETE", "/api/delete", {"model": model})

    def copy(self, source: str, destination: str) -> None:
        self.request("POST", "/api/copy", {"source": source, "destination": destination})

    def create(self, model: str, directory: str | None = None, **fields: Any) -> dict[str, Any]:
        """POST /api/create: `directory` (or fields["from"], a model name) plus Modelfile fields."""
        body = {"model": model, **fields, "stream": False}
        if directory is not None:
            body["from"] = directory
        return dict(self.request("POST", "/api/create", body) or {})

    def unload(self, model: str) -> None:
        self.request("POST", "/api/generate", {"model": model, "keep_alive": 0})

    def status(self) -> dict[str, Any]:
        """The status snapshot the status page shows (GET /ui/state)."""
        return dict(self.request("GET", "/ui/state"))

    def pull(self, model: str) -> Iterator[dict[str, Any]]:
        return self.stream("/api/pull", {"model": model, "stream": True})
