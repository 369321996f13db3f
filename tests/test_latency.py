"""Per-request latency guards (issue 16): no socket-level stall, no lost request
on a kept-alive connection, and the runner's stream lines.

The stall: a listening socket made without proto IPPROTO_TCP leaves Nagle on
for accepted connections (asyncio sets TCP_NODELAY only when proto says TCP),
and every small response then waits ~40 ms for the client's delayed ACK.
20 sequential requests take ~0.9 s with the stall and a few ms without it.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from corral.runner.protocol import chunk_line
from corral.supervisor.config import Settings
from corral.supervisor.serve import _bind

from tests.support.live_server import ServerProcess

STALL_BUDGET_S = 0.1  # for 20 requests; the stall alone costs ~0.8 s
IDLE_S = 6.0  # past httpx's 5 s keep-alive expiry (and uvicorn's default server timeout)


@pytest.fixture(scope="module")
def server(hf_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    cache = tmp_path_factory.mktemp("hf-latency") / "hub"
    shutil.copytree(hf_cache, cache, symlinks=True)
    with ServerProcess(tmp_path_factory.mktemp("home"), cache) as s:
        yield s


def sequential_gets(url: str, path: str, n: int = 20) -> float:
    with httpx.Client(base_url=url, timeout=10) as client:
        client.get(path).raise_for_status()  # connect once, outside the timing
        t0 = time.perf_counter()
        for _ in range(n):
            client.get(path).raise_for_status()
        return time.perf_counter() - t0


def test_bound_socket_gives_tcp_nodelay_connections() -> None:
    sock = _bind(Settings(host="127.0.0.1", port=0))
    try:
        assert sock.proto == socket.IPPROTO_TCP
        sock.listen()
        with socket.create_connection(sock.getsockname()[:2]):
            conn, _ = sock.accept()
            with conn:
                # asyncio sets TCP_NODELAY on accepted sockets only when this holds
                assert conn.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


@pytest.mark.e2e
def test_sequential_requests_do_not_stall(server: ServerProcess) -> None:
    # best of 3: a shared machine may stall any one run; the bug stalls every one
    elapsed = min(sequential_gets(server.url, "/api/ps") for _ in range(3))
    assert elapsed < STALL_BUDGET_S, f"20 GET /api/ps took {elapsed * 1000:.0f} ms"


def request_after_idle(host: str, port: int, path: str, idle: float) -> bytes:
    """Two requests on one HTTP/1.1 connection, `idle` seconds apart; the second reply."""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(request)
        _read_response(s)
        time.sleep(idle)
        s.sendall(request)
        return _read_response(s)


def _read_response(s: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return data  # closed by the server
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += s.recv(65536)
    return head + b"\r\n\r\n" + body


@pytest.mark.e2e
@pytest.mark.slow
def test_kept_alive_connection_outlasts_client_expiry(server: ServerProcess) -> None:
    # A server that closes idle connections exactly when clients expire theirs
    # races them: a request sent in that instant is lost with no response.
    reply = request_after_idle("127.0.0.1", server.port, "/api/ps", IDLE_S)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]


def test_chunk_line_bytes_mean_chunk_line() -> None:
    from corral.runner.routes import _chunk_bytes

    for text in ["a", ' "quoted" \\ back', "new\nline\ttab", "café ☕ 𝄞", "\x00\x1f"]:
        raw = _chunk_bytes(text)
        assert raw.endswith(b"\n") and raw.count(b"\n") == 1
        assert json.loads(raw) == chunk_line(text)


async def test_ready_events_takes_all_queued_without_waiting_for_more() -> None:
    from corral.runner.engine import Sequence
    from corral.runner.protocol import SamplingOptions
    from corral.runner.routes import _ready_events

    seq = Sequence(prompt=[1], options=SamplingOptions(), max_tokens=4, loop=asyncio.get_running_loop())
    seq.emit("text", "a")
    assert await asyncio.wait_for(_ready_events(seq), 5) == [("text", "a")]  # first alone, at once
    for ev in [("text", "b"), ("text", "c"), ("done", {})]:
        seq.out.put_nowait(ev)
    assert await _ready_events(seq) == [("text", "b"), ("text", "c"), ("done", {})]
