"""Async HTTP client for one runner (the supervisor side of the runner protocol)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator
from typing import Any
from urllib.parse import urlsplit

import httpx
from corral.runner.protocol import (
    ROUTE_COMPLETION,
    ROUTE_DETOKENIZE,
    ROUTE_EMBED,
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
from corral.supervisor.runner_stream import StreamBroken, StreamPool


def _error_message(status: int, body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip() or f"runner answered HTTP {status}"
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return data["error"]
    return f"runner answered HTTP {status}"


def _raise_for_status(status: int, body: bytes) -> None:
    if status < 400:
        return
    msg = _error_message(status, body)
    if status < 500:
        raise BadRequest(msg)
    raise RunnerFailed(msg)


def _raise_for(resp: httpx.Response) -> None:
    _raise_for_status(resp.status_code, resp.content)


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


def _merged(chunks: list[Chunk]) -> Chunk:
    """Chunks that arrived together as one: their text, reasoning and logprobs in order."""
    if len(chunks) == 1:
        return chunks[0]
    return Chunk("".join(c.content for c in chunks), "".join(c.thinking for c in chunks),
                 tuple(lp for c in chunks for lp in c.logprobs))


def _parse_line(raw: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise RunnerFailed(f"runner sent an invalid stream line: {raw[:200]!r}") from e
    if not isinstance(obj, dict):
        raise RunnerFailed(f"runner sent a stream line that is not an object: {raw[:200]!r}")
    return obj


STREAMS_PER_SLOT = 2
"""Completion streams in flight to a runner per sequence it decodes at once (see limit_streams)."""


class RunnerClient:
    def __init__(self, base_url: str, token: str | None, *, timeout: float = 30.0,
                 num_parallel: int = 4) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url
        # Streams may idle for long between tokens (a long prefill): no read timeout there.
        # No pool caps: the stream gate below bounds the streams, and control
        # requests (/health, /status) must never wait behind them (a stall check
        # that queued behind busy streams would call a healthy runner hung).
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        # verify=False: runners speak plain HTTP on loopback, never TLS, and the
        # default would load the CA bundle for every runner: ~90 ms of CPU on the
        # event loop (every stream waits) and about a megabyte that the C allocator
        # keeps after the client is gone.
        self._http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, limits=limits,
                                       verify=False)
        self._timeout = timeout
        self._stream_gate = asyncio.Semaphore(STREAMS_PER_SLOT * num_parallel)
        where = urlsplit(base_url)
        self._streams = StreamPool(where.hostname or "127.0.0.1", where.port or 80, headers,
                                   connect_timeout=timeout)

    def limit_streams(self, num_parallel: int) -> None:
        """Bound the completion streams in flight to STREAMS_PER_SLOT x num_parallel.

        The runner decodes num_parallel sequences and queues the rest, so more
        streams in flight than twice that only wait there. They would not be
        free here: httpx's pool scans every connection it holds (a readability
        syscall for each idle one) whenever a request starts or ends, so 256
        clients on one model cost O(n^2) and the supervisor's CPU per request
        grew from 6 to 20 ms. Past the gate, requests wait on a semaphore in
        arrival order, at no cost. Called before the runner serves anything
        (a standby learns its num_parallel when it is adopted).
        """
        self._stream_gate = asyncio.Semaphore(STREAMS_PER_SLOT * max(1, num_parallel))

    async def aclose(self) -> None:
        self._streams.close()
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

    async def _batches(self, body: dict[str, Any]) -> AsyncGenerator[list[dict[str, Any]], None]:
        """POST /completion; yield the stream's lines, parsed, one list per network read.

        Per read, not per line: when the supervisor lags behind a fast runner
        several lines arrive together and the caller handles them as one. After
        the done line the rest of the body is read before it is handed out, so
        the caller closing the stream leaves the connection clean for the next
        request (a response closed unread takes its connection with it).
        Closing this generator early closes the response, which makes the runner
        cancel the sequence.
        """
        self._check_open()
        payload = json.dumps(body).encode()
        try:
            async with contextlib.AsyncExitStack() as stack, self._stream_gate, self._streams.post(ROUTE_COMPLETION, payload) as resp:
                if resp.status >= 400:
                    _raise_for_status(resp.status, await resp.read())
                reads = await stack.enter_async_context(contextlib.aclosing(resp.chunks()))
                rest = b""
                async for data in reads:
                    *complete, rest = (rest + data).split(b"\n")
                    batch = [_parse_line(raw) for raw in complete if raw.strip()]
                    if batch and batch[-1].get("done"):
                        async for _ in reads:  # the chunked body's terminator
                            pass
                        yield batch
                        return
                    if batch:
                        yield batch
                if rest.strip():
                    line = _parse_line(rest)
                    yield [line]
                    if line.get("done"):
                        return
                raise RunnerFailed("runner stream ended before it was done")
        except StreamBroken as e:
            raise RunnerFailed(str(e)) from e

    async def completion(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """The runner's NDJSON lines as dicts, error lines included (see events())."""
        batches = self._batches(body)
        try:
            async for batch in batches:
                for line in batch:
                    yield line
        finally:
            await batches.aclose()

    async def events(self, request: RunnerRequest) -> AsyncGenerator[StreamEvent, None]:
        """POST /completion as typed events: Chunks, then one Done; an error line raises.

        Text lines that arrived in one read become one Chunk, so a supervisor
        that lags pays per read, not per token.
        """
        batches = self._batches(request.to_wire())
        try:
            async for batch in batches:
                chunks: list[Chunk] = []
                for line in batch:
                    if chunks and (line.get("done") or "error" in line):
                        yield _merged(chunks)  # the text before the end goes out first
                        chunks = []
                    event = event_from_line(line)
                    if isinstance(event, Chunk):
                        chunks.append(event)
                    else:
                        yield event
                if chunks:
                    yield _merged(chunks)
        finally:
            await batches.aclose()

    # -- embedding runners ----------------------------------------------------

    async def embed(self, body: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
        """POST /embed (see ROUTE_EMBED): a 4xx is BadRequest, anything else RunnerFailed.

        A large batch on a CPU may take minutes, hence the long timeout.
        """
        data = await self._request("POST", ROUTE_EMBED, body, timeout=timeout)
        if not isinstance(data, dict) or not isinstance(data.get("embeddings"), list):
            raise RunnerFailed("runner sent a malformed /embed answer")
        return data
