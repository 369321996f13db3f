"""Async HTTP client for one runner (the supervisor side of the runner protocol)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

import httpx
from corral.runner.protocol import (
    ROUTE_COMPLETION,
    ROUTE_DETOKENIZE,
    ROUTE_HEALTH,
    ROUTE_STATUS,
    ROUTE_TOKENIZE,
    Chunk,
    Done,
    RunnerRequest,
    chunk_from_line,
    done_from_line,
)
from corral.supervisor.errors import BadRequest, RunnerFailed


def _error_message(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return resp.text.strip() or f"runner answered HTTP {resp.status_code}"
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return data["error"]
    return f"runner answered HTTP {resp.status_code}"


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    msg = _error_message(resp)
    if resp.status_code < 500:
        raise BadRequest(msg)
    raise RunnerFailed(msg)


StreamEvent = Chunk | Done


def event_from_line(line: Any) -> StreamEvent:
    """One runner stream line as a typed event; an error line raises RunnerFailed.

    The one place the NDJSON line shapes are read on the supervisor side (the
    test fakes feed their scripted lines through it too).
    """
    if not isinstance(line, dict):
        raise RunnerFailed(f"runner sent a stream line that is not an object: {str(line)[:200]!r}")
    if line.get("done"):
        return done_from_line(line)
    if "error" in line:
        raise RunnerFailed(str(line["error"]))
    return chunk_from_line(line)


class RunnerClient:
    def __init__(self, base_url: str, token: str | None, *, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url
        # Streams may idle for long between tokens (a long prefill): no read timeout there.
        self._http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout)
        self._timeout = timeout

    async def aclose(self) -> None:
        await self._http.aclose()

    def _check_open(self) -> None:
        # closed once its runner exited: a late caller gets a RunnerFailed, not httpx's RuntimeError
        if self._http.is_closed:
            raise RunnerFailed("runner has exited")

    async def _request(self, method: str, route: str, body: dict[str, Any] | None = None,
                       timeout: float | None = None) -> Any:
        """A JSON route: transport failures are RunnerFailed, 4xx BadRequest, 5xx RunnerFailed."""
        self._check_open()
        try:
            resp = await self._http.request(method, route, json=body,
                                            timeout=self._timeout if timeout is None else timeout)
        except httpx.HTTPError as e:
            raise RunnerFailed(f"runner unreachable: {e}") from e
        _raise_for(resp)
        return resp.json()

    async def health(self, timeout: float = 2.0) -> bool:
        if self._http.is_closed:
            return False
        try:
            resp = await self._http.get(ROUTE_HEALTH, timeout=timeout)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    async def status(self, timeout: float = 5.0) -> dict[str, Any]:
        data = await self._request("GET", ROUTE_STATUS, timeout=timeout)
        return data if isinstance(data, dict) else {}

    async def tokenize(self, text: str) -> list[int]:
        data = await self._request("POST", ROUTE_TOKENIZE, {"content": text})
        return [int(t) for t in data["tokens"]]

    async def detokenize(self, tokens: list[int]) -> str:
        data = await self._request("POST", ROUTE_DETOKENIZE, {"tokens": tokens})
        return str(data["content"])

    async def completion(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """Yield the runner's NDJSON lines; closing this generator closes the response,
        which makes the runner cancel the sequence."""
        self._check_open()
        timeout = httpx.Timeout(self._timeout, read=None)
        try:
            async with self._http.stream("POST", ROUTE_COMPLETION, json=body, timeout=timeout) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    _raise_for(resp)
                done = False
                async for line in resp.aiter_lines():
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except ValueError as e:
                        raise RunnerFailed(f"runner sent an invalid stream line: {line[:200]!r}") from e
                    if isinstance(obj, dict) and "error" in obj:
                        raise RunnerFailed(str(obj["error"]))
                    yield obj
                    if isinstance(obj, dict) and obj.get("done"):
                        done = True
                        break
                if not done:
                    raise RunnerFailed("runner stream ended before it was done")
        except httpx.HTTPError as e:
            raise RunnerFailed(f"connection to runner broken: {e}") from e

    async def events(self, request: RunnerRequest) -> AsyncGenerator[StreamEvent, None]:
        """completion() as typed events: Chunk per text line, then one Done; errors raise."""
        lines = self.completion(request.to_wire())
        try:
            async for line in lines:
                yield event_from_line(line)
        finally:
            await lines.aclose()
