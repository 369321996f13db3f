"""supervisor/runner_stream.py against a real socket server that answers scripted HTTP/1.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
from corral.supervisor.runner_stream import StreamBroken, StreamPool


def chunked(*parts: bytes) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)
    return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n"


class Server:
    """Reads one request at a time per connection and writes what `answer` returns."""

    def __init__(self, answer: Callable[[bytes], bytes | None]) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed_by_peer = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                reply = self.answer(body)
                if reply is None:  # hang up without answering
                    break
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_peer.set()
        finally:
            writer.close()


@asynccontextmanager
async def serving(answer: Callable[[bytes], bytes | None]) -> AsyncIterator[tuple[Server, StreamPool]]:
    server = Server(answer)
    srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    pool = StreamPool("127.0.0.1", port, {"Authorization": "Bearer t"}, connect_timeout=5)
    try:
        yield server, pool
    finally:
        pool.close()
        srv.close()
        await srv.wait_closed()


async def test_chunked_body_arrives_and_the_connection_is_reused() -> None:
    async with serving(lambda body: chunked(b'{"content":"a"}\n', b'{"done":true}\n')) as (server, pool):
        for _ in range(3):
            async with pool.post("/completion", b'{"prompt":"x"}') as resp:
                assert resp.status == 200
                assert await resp.read() == b'{"content":"a"}\n{"done":true}\n'
        assert server.connections == 1
        assert len(server.requests) == 3
        first = server.requests[0]
        assert first.startswith(b"POST /completion HTTP/1.1\r\n")
        assert b"Authorization: Bearer t\r\n" in first and first.endswith(b'{"prompt":"x"}')


async def test_error_with_content_length_is_read_whole() -> None:
    reply = b'HTTP/1.1 400 Bad Request\r\ncontent-length: 17\r\n\r\n{"error":"nope!"}'
    async with serving(lambda body: reply) as (server, pool):
        async with pool.post("/completion", b"{}") as resp:
            assert resp.status == 400
            assert await resp.read() == b'{"error":"nope!"}'
        async with pool.post("/completion", b"{}") as resp:
            await resp.read()
        assert server.connections == 1  # a body read to its end leaves the connection clean


async def test_abandoned_body_closes_the_connection() -> None:
    # The runner learns that its client went away from the closed connection.
    async with serving(lambda body: chunked(b"one\n", b"two\n")) as (server, pool):
        async with pool.post("/completion", b"{}") as resp:
            async for _ in resp.chunks():
                break
        await asyncio.wait_for(server.closed_by_peer.wait(), 5)
        async with pool.post("/completion", b"{}") as resp:
            assert await resp.read() == b"one\ntwo\n"
        assert server.connections == 2


async def test_idle_connection_closed_by_the_runner_is_replaced() -> None:
    answers = iter([chunked(b"first\n"), None, chunked(b"second\n")])

    async with serving(lambda body: next(answers)) as (server, pool):
        async with pool.post("/completion", b"{}") as resp:
            assert await resp.read() == b"first\n"
        # the server hangs up on the next request it reads (as a keep-alive timeout
        # racing a reuse would): the request goes again on a fresh connection
        async with pool.post("/completion", b"{}") as resp:
            assert await resp.read() == b"second\n"
        assert server.connections == 2


async def test_unreachable_runner_is_stream_broken() -> None:
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()
    pool = StreamPool("127.0.0.1", port, {}, connect_timeout=5)
    with pytest.raises(StreamBroken, match="unreachable"):
        async with pool.post("/completion", b"{}"):
            pass


async def test_body_cut_short_is_stream_broken() -> None:
    async def cut_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel")
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(cut_short, "127.0.0.1", 0)
    pool = StreamPool("127.0.0.1", srv.sockets[0].getsockname()[1], {}, connect_timeout=5)
    try:
        async with pool.post("/completion", b"{}") as resp:
            with pytest.raises(StreamBroken, match="broken"):
                await resp.read()
    finally:
        srv.close()
        await srv.wait_closed()


async def test_first_request_on_a_fresh_connection_that_gets_no_answer_fails() -> None:
    # only a reused connection is retried: a fresh one that dies means the runner is in trouble
    async with serving(lambda body: None) as (server, pool):
        with pytest.raises(StreamBroken):
            async with pool.post("/completion", b"{}"):
                pass
        assert server.connections == 1


async def test_a_connection_idle_too_long_is_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    from corral.supervisor import runner_stream

    async with serving(lambda body: chunked(b"x\n")) as (server, pool):
        async with pool.post("/completion", b"{}") as resp:
            await resp.read()
        monkeypatch.setattr(runner_stream, "IDLE_EXPIRY_S", 0.0)
        async with pool.post("/completion", b"{}") as resp:
            await resp.read()
        assert server.connections == 2


async def test_a_runner_client_loads_no_certificates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runners speak plain HTTP on loopback. Loading the CA bundle for each runner's
    client cost ~90 ms of the event loop's CPU per runner start and about a megabyte
    the allocator kept after the client was gone (the supervisor grew ~0.8 MiB per
    runner started in the soak)."""
    import ssl

    from corral.supervisor.runner_client import RunnerClient

    loads: list[object] = []
    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", lambda self, *a, **k: loads.append(a or k))
    client = RunnerClient("http://127.0.0.1:9", token="t")
    await client.aclose()
    assert loads == []
