"""The supervisor's connections for runners' completion streams: plain HTTP/1.1 on asyncio streams.

Every streamed token crosses this hop, and every request opens a stream here,
so its cost per read and per request is paid at every token and every
request. httpx (used for the runner's other routes) spends most of the
supervisor's CPU per request on this path: its pool checks every connection it
holds with a syscall whenever a request starts or ends, and each body read
goes through five layers (httpx, httpcore, anyio, h11). The runner is our own
process on loopback, answering one known request shape, so this module speaks
just what that takes: a POST with a JSON body, a status line and headers, and
a chunked (or Content-Length) body, on kept-alive connections.

A connection goes back to the idle list only when its response was read to
the end; one abandoned mid-body (the client went away, the caller was
cancelled) is closed, which is also how the runner learns to cancel the
sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

MAX_HEADER_BYTES = 64 * 1024
MAX_IDLE = 64  # kept-alive connections per runner beyond which a finished one is closed
IDLE_EXPIRY_S = 600.0
"""A connection idle this long is closed rather than reused: well inside the
runner's own keep-alive (an hour), so the runner never closes one just as it
is reused. (Should that race happen anyway, the request goes again on a fresh
connection: a runner that closed a connection had not read a request on it.)"""


class StreamBroken(Exception):
    """The connection failed or the runner answered something that is not HTTP/1.1."""


@dataclass(frozen=True, slots=True)
class Head:
    status: int
    chunked: bool
    length: int | None  # Content-Length, when not chunked
    keep_alive: bool


class _Conn:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.idle_since = time.monotonic()

    def usable(self) -> bool:
        # An idle connection the runner closed has seen EOF by now.
        return (not self.reader.at_eof() and not self.writer.is_closing()
                and time.monotonic() - self.idle_since < IDLE_EXPIRY_S)

    def close(self) -> None:
        self.writer.close()


class Response:
    """One response: `head`, then `chunks()` (the body as it arrives) or `read()`."""

    def __init__(self, pool: StreamPool, conn: _Conn, head: Head) -> None:
        self._pool, self.head = pool, head
        self._conn: _Conn | None = conn  # None once closed
        self._finished = False

    @property
    def status(self) -> int:
        return self.head.status

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        if self._conn is None:
            raise StreamBroken("response already closed")
        reader = self._conn.reader
        try:
            if not self.head.chunked:
                left = self.head.length
                while left is None or left > 0:
                    data = await reader.read(65536 if left is None else min(left, 65536))
                    if not data:
                        if left is None:  # body ends with the connection
                            break
                        raise StreamBroken("runner closed the connection mid-body")
                    if left is not None:
                        left -= len(data)
                    yield data
                self._finished = left == 0
                return
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0], 16)
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then the blank line
                        pass
                    self._finished = True
                    return
                data = await reader.readexactly(size + 2)
                yield data[:-2]
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            raise StreamBroken(f"connection to runner broken: {e!r}") from e

    async def read(self) -> bytes:
        return b"".join([c async for c in self.chunks()])

    def close(self) -> None:
        """Idempotent: a fully read body gives the connection back, anything else closes it."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._finished and self.head.keep_alive:
            self._pool.release(conn)
        else:
            conn.close()


class StreamPool:
    """Kept-alive HTTP/1.1 connections to one runner, for its POST routes."""

    def __init__(self, host: str, port: int, headers: dict[str, str], *, connect_timeout: float) -> None:
        self.host, self.port, self.connect_timeout = host, port, connect_timeout
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in {"Host": f"{host}:{port}", **headers}.items())
        self._idle: list[_Conn] = []
        self._closed = False

    @contextlib.asynccontextmanager
    async def post(self, path: str, body: bytes) -> AsyncIterator[Response]:
        """POST `body` (JSON) to `path`; the Response's connection is released on exit."""
        response = await self._send(path, body)
        try:
            yield response
        finally:
            response.close()

    async def _send(self, path: str, body: bytes) -> Response:
        request = (f"POST {path} HTTP/1.1\r\n{self._fixed}Content-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1") + body
        while True:
            conn, reused = self._take()
            if conn is None:
                conn = await self._connect()
            try:
                conn.writer.write(request)
                head = await _read_head(conn.reader)
            except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
                conn.close()
                if reused:  # the runner closed an idle connection as we reused it: it read nothing
                    continue
                raise StreamBroken(f"connection to runner broken: {e!r}") from e
            except BaseException:  # cancelled while waiting: the connection's state is unknown
                conn.close()
                raise
            return Response(self, conn, head)

    def _take(self) -> tuple[_Conn | None, bool]:
        while self._idle:
            conn = self._idle.pop()  # the most recently used: least likely to have timed out
            if conn.usable():
                return conn, True
            conn.close()
        return None, False

    async def _connect(self) -> _Conn:
        if self._closed:
            raise StreamBroken("runner client is closed")
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, limit=MAX_HEADER_BYTES), self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise StreamBroken(f"runner unreachable: {e!r}") from e
        return _Conn(reader, writer)

    def release(self, conn: _Conn) -> None:
        conn.idle_since = time.monotonic()
        if self._closed or len(self._idle) >= MAX_IDLE or not conn.usable():
            conn.close()
        else:
            self._idle.append(conn)

    def close(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()


async def _read_head(reader: asyncio.StreamReader) -> Head:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise ValueError(f"not an HTTP/1.x status line: {lines[0][:100]!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    length = None if chunked or "content-length" not in headers else int(headers["content-length"])
    keep_alive = headers.get("connection", "").lower() != "close" and parts[0] == "HTTP/1.1"
    if not chunked and length is None:
        keep_alive = False  # the body ends when the connection does
    return Head(status, chunked, length, keep_alive)
