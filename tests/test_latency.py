"""Per-request latency guards (issue 16): no socket-level stall, no lost request
on a kept-alive connection, and the runner's stream lines.

The stall: a listening socket made without proto IPPROTO_TCP leaves Nagle on
for accepted connections (asyncio sets TCP_NODELAY only when proto says TCP),
and every small response then waits for the client's delayed ACK: at least
40 ms per request on Linux, where a trivial request otherwise takes ~1-2 ms
(20 sequential GET /api/ps: ~0.9 s with the stall, ~30 ms without).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from corral.runner.protocol import chunk_line
from corral.supervisor.config import Settings
from corral.supervisor.serve import _bind

from tests.support.live_server import ServerProcess
from tests.test_runner import RunnerProcess

STALL_BUDGET_S = 0.02  # median per request: half the stall's floor, ~10x a quiet machine's time
IDLE_S = 6.0  # past httpx's 5 s keep-alive expiry (and uvicorn's default server timeout)


@pytest.fixture(scope="module")
def server(hf_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    cache = tmp_path_factory.mktemp("hf-latency") / "hub"
    shutil.copytree(hf_cache, cache, symlinks=True)
    with ServerProcess(tmp_path_factory.mktemp("home"), cache) as s:
        yield s


@pytest.fixture(scope="module")
def runner(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunnerProcess]:
    r = RunnerProcess(tiny_model, tmp_path_factory.mktemp("runner")).start()
    yield r
    r.stop()


def median_get_s(url: str, path: str, n: int = 20) -> float:
    """Median time of n sequential GETs on one kept-alive httpx connection."""
    times = []
    with httpx.Client(base_url=url, timeout=10) as client:
        client.get(path).raise_for_status()  # connect once, outside the timing
        for _ in range(n):
            t0 = time.perf_counter()
            client.get(path).raise_for_status()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
    # A median, best of 3: a shared machine may slow some requests; the bug stalls every one.
    median = min(median_get_s(server.url, "/api/ps") for _ in range(3))
    assert median < STALL_BUDGET_S, f"GET /api/ps took {median * 1000:.1f} ms (median of 20)"


@pytest.mark.e2e
def test_runner_requests_do_not_stall(runner: RunnerProcess) -> None:
    median = min(median_get_s(runner.url, "/health") for _ in range(3))
    assert median < STALL_BUDGET_S, f"GET /health took {median * 1000:.1f} ms (median of 20)"


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


@pytest.mark.e2e
@pytest.mark.slow
def test_runner_keeps_idle_supervisor_connections(runner: RunnerProcess) -> None:
    # The supervisor's pool (httpx) reuses a connection up to 5 s idle; the runner
    # closing it at the same moment would lose the request sent on it.
    reply = request_after_idle("127.0.0.1", runner.port, "/health", IDLE_S)
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
