"""Issue 9, item 9: half-open connections (slowloris) are closed by header and body read timeouts.

Real `corral serve` processes and real sockets. The timeouts are set small (1 s); every
wait below is a generous upper bound on "eventually closed", never a timing assertion.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from corral.supervisor.config import Settings

from tests.support.live_server import ServerProcess

LIMIT_S = 1.0
CLOSED_WITHIN_S = 20.0  # far above the limit: a busy machine must not make this flaky


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("read-timeouts")
    env = {"CORRAL_HEADER_TIMEOUT": f"{LIMIT_S}s", "CORRAL_BODY_TIMEOUT": f"{LIMIT_S}s"}
    with ServerProcess(root / "home", root / "hub", env=env) as srv:
        yield srv


def _connect(srv: ServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=CLOSED_WITHIN_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes; raises socket.timeout if it never does."""
    got = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return got
        got += chunk


def _read_response(sock: socket.socket) -> bytes:
    """One complete response with a Content-Length body."""
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {got!r}"
        got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed mid-body"
        body += chunk
    return head + b"\r\n\r\n" + body


def _request(path: str, port: int, body: bytes = b"", method: str = "GET") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if method != "GET":
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def _served(srv: ServerProcess) -> bool:
    return httpx.get(srv.url + "/api/version", timeout=10).status_code == 200


def test_defaults_are_bounded() -> None:
    settings = Settings()
    assert settings.header_timeout == 30 and settings.body_timeout == 60


def test_half_a_header_line_is_answered_408_and_closed(server: ServerProcess) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /api/ps HT")  # and then nothing
        got = _read_until_closed(sock)
    assert got.startswith(b"HTTP/1.1 408 "), got
    assert _served(server)


def test_a_connection_that_never_sends_is_closed(server: ServerProcess) -> None:
    with _connect(server) as sock:
        assert _read_until_closed(sock).startswith(b"HTTP/1.1 408 ")


def test_trickled_headers_do_not_extend_the_header_bound(server: ServerProcess) -> None:
    """One byte every 50 ms, each well inside the limit: the bound is on the whole header."""
    request = _request("/api/version", server.port).removesuffix(b"\r\n") + b"X-Pad: " + b"a" * 300
    sent = 0
    with _connect(server) as sock:
        for byte in request:  # 13+ seconds of bytes if nobody stops us
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable:
                break  # the server answered (408) or closed: it gave up on us
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            sent += 1
        assert sent < len(request), "the server kept reading a header trickled for 13+ seconds"
        assert _read_until_closed(sock).startswith(b"HTTP/1.1 408 ")


def test_a_body_that_stops_arriving_is_closed(server: ServerProcess) -> None:
    body = b'{"model": "corral-test/none"}'
    with _connect(server) as sock:
        head = _request("/api/show", server.port, b"", "POST").replace(b"Content-Length: 0",
                                                                        f"Content-Length: {len(body) + 50}".encode())
        sock.sendall(head + body)  # 50 bytes short, forever
        got = _read_until_closed(sock)
    assert b"200 OK" not in got, got
    assert _served(server)


def test_a_slow_but_steady_body_is_served(server: ServerProcess) -> None:
    """The body bound is on silence: a body arriving in pieces, each inside the limit, is read."""
    body = b'{"model": "corral-test/none"' + b" " * 40 + b"}"
    pieces = [body[i:i + 10] for i in range(0, len(body), 10)]
    with _connect(server) as sock:
        sock.sendall(_request("/api/show", server.port, b"", "POST").replace(
            b"Content-Length: 0", f"Content-Length: {len(body)}".encode()))
        for piece in pieces:  # ~7 pieces over ~2.5 s: longer than the limit in all
            time.sleep(LIMIT_S * 0.35)
            sock.sendall(piece)
        response = _read_response(sock)
    assert response.startswith(b"HTTP/1.1 404 "), response  # an answer about the model, not a timeout


def test_idle_keep_alive_connections_are_left_to_keep_alive(server: ServerProcess) -> None:
    """Between requests a connection is idle, not slow: the header bound starts at the next byte."""
    with _connect(server) as sock:
        sock.sendall(_request("/api/version", server.port))
        assert _read_response(sock).startswith(b"HTTP/1.1 200 ")
        time.sleep(LIMIT_S * 2.5)
        sock.sendall(_request("/api/version", server.port))
        assert _read_response(sock).startswith(b"HTTP/1.1 200 ")


def test_others_are_served_while_slow_clients_hold_connections(server: ServerProcess) -> None:
    slow = [_connect(server) for _ in range(20)]
    try:
        for i, sock in enumerate(slow):
            sock.sendall(b"POST /api/show HTTP/1.1\r\nHost: 127.0.0.1\r\n" if i % 2 else b"GE")
        with httpx.Client(base_url=server.url, timeout=10) as http:
            assert all(http.get("/api/version").status_code == 200 for _ in range(5))
        for sock in slow:
            _read_until_closed(sock)  # each is closed in the end
    finally:
        for sock in slow:
            sock.close()
