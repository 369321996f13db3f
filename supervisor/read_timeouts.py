"""Header and body read timeouts for the supervisor's HTTP server (slowloris guard).

uvicorn closes idle keep-alive connections (timeout_keep_alive), but a
connection that is mid-request has no bound: a client that sends half a
request line, or headers announcing a body it never sends, holds its socket
and its task forever. uvicorn has no setting for this, so its httptools
protocol (the C parser: about 20% less of this process's CPU per one-token
request than its h11 one, in scripts/bench_load.py) is subclassed:

- headers: from the connection's first moment (or a keep-alive request's first
  byte) the client has `header_timeout` seconds to finish the request headers.
  A total bound, not an idle one: trickling a byte at a time does not help.
  When it expires the client gets 408 (if no response is under way) and the
  connection is closed.
- body: while a body is being received, `body_timeout` seconds without a byte
  close the connection (an idle bound, so a large upload over a slow link is
  fine; a client that stops sending is not). While the server itself is not
  reading (uvicorn's flow control paused reads until the app takes the body)
  the silence is ours, not the client's, and does not count.

The cost per request is small: the parser's callbacks only note where the
request stands, and the timer is armed once per received chunk from that note,
so a request that arrives whole (the usual case) arms and cancels nothing.
The body timer is one TimerHandle per body that re-arms itself from a
last-byte timestamp instead of being rescheduled per chunk.

Runners are not guarded: they listen on loopback, require their own token,
and only the supervisor (whose client has its own timeouts) talks to them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("corral")

_TIMEOUT_BODY = b'{"error":"request headers were not received in time"}'
_REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header and body read timeouts (seconds; <= 0: none)."""

    header_timeout: float = 30.0
    body_timeout: float = 60.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._phase = ""  # the phase the timer is armed for: "header", "body" or ""
        self._reading = "header"  # where the parser says the request stands; a silent new connection counts
        self._timer: asyncio.TimerHandle | None = None
        self._last_read = 0.0
        self._enter("header")

    def connection_lost(self, exc: Exception | None) -> None:
        self._enter("")
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._enter("" if self.transport.is_closing() else self._reading)

    # -- the parser's callbacks: note where the request stands ----------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading = "header"  # a request's first byte is in

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self.parser.should_upgrade() and self._should_upgrade():
            self._reading = ""  # a WebSocket upgrade: the connection goes to another protocol
            return
        self._reading = "body"
        self._last_read = time.monotonic()

    def on_body(self, body: bytes) -> None:
        self._last_read = time.monotonic()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._reading = ""  # headers and body are in
        super().on_message_complete()

    # -- the timer ------------------------------------------------------------

    def _enter(self, phase: str) -> None:
        if phase == self._phase:
            return  # the header bound is total: arriving bytes do not extend it
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = phase
        limit = self.header_timeout if phase == "header" else self.body_timeout
        if phase and limit > 0:
            self._timer = self.loop.call_later(limit, self._expired)

    def _expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._phase == "body":
            if self.flow.read_paused:  # the app has not taken the body yet: our silence, not the client's
                self._last_read = time.monotonic()
            idle = time.monotonic() - self._last_read
            if idle < self.body_timeout:
                self._timer = self.loop.call_later(self.body_timeout - idle, self._expired)
                return
        self._close_slow(self._phase)

    def _close_slow(self, phase: str) -> None:
        limit = self.header_timeout if phase == "header" else self.body_timeout
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        log.info("closing the connection from %s: request %s not received within %gs", client,
                 "headers" if phase == "header" else "body", limit)
        if phase == "header" and (self.cycle is None or self.cycle.response_complete):
            self.transport.write(_REQUEST_TIMEOUT)
        self._phase = ""
        self.transport.close()


def guarded_protocol(header_timeout: float, body_timeout: float) -> type[GuardedHttpToolsProtocol]:
    """The protocol class for uvicorn.Config(http=...), with these timeouts."""
    attrs: dict[str, Any] = {"header_timeout": float(header_timeout), "body_timeout": float(body_timeout)}
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), attrs)
