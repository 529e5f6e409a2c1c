"""Slow and idle connections (issue 16 item 4): header and body deadlines, a connection cap with a clear refusal,
and the service still answering while a bounded number of attacking sockets is held open (loopback only)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from squadbus.service.server import ServerLimits, protocol_class
from squadbus.testing.servers.process import free_port
from tests.service.conftest import MakeApp, message

LIVENESS_TIMEOUT = 10.0  # generous: a liveness check, not a latency assertion
PARTIAL_HEADERS = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def guarded(app: FastAPI, limits: ServerLimits, http: str) -> AsyncIterator[int]:
    """Serve ``app`` on 127.0.0.1 with the protocol ``squadbus serve`` uses; yields the port."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2,
                            http=protocol_class(limits, http=http))
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(500):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        assert server.started, "uvicorn did not start"
        yield port
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def sockets(port: int, count: int, first: bytes = b"") -> AsyncIterator[list[Conn]]:
    """``count`` raw connections that send ``first`` and then nothing; all closed on exit."""
    conns: list[Conn] = []
    try:
        for _ in range(count):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if first:
                writer.write(first)
                await writer.drain()
            conns.append((reader, writer))
        yield conns
    finally:
        for _, writer in conns:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def answer_of(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    return await asyncio.wait_for(reader.read(), LIVENESS_TIMEOUT)


@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_slow_headers_get_408_and_the_server_keeps_answering(make_app: MakeApp, http: str) -> None:
    app = make_app(workers=())
    async with guarded(app, ServerLimits(max_connections=64, header_timeout=1.0), http) as port, \
            sockets(port, 40, PARTIAL_HEADERS) as slow:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=LIVENESS_TIMEOUT) as c:
            # 40 sockets trickling headers: requests from others are still served
            assert (await c.get("/healthz")).status_code == 200
            assert (await c.post("/v1/messages", json=message())).status_code == 201
        answers = await asyncio.gather(*(answer_of(reader) for reader, _ in slow))
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), answers[0]


@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_connections_past_the_cap_are_refused_at_once(make_app: MakeApp, http: str) -> None:
    app = make_app(workers=())
    cap = 20
    async with guarded(app, ServerLimits(max_connections=cap, header_timeout=1.5), http) as port:
        async with sockets(port, cap) as idle, sockets(port, 5) as extra:
            refusals = await asyncio.gather(*(answer_of(reader) for reader, _ in extra))
            assert all(r.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in r for r in refusals), refusals[0]
            # the idle ones are closed by the header deadline, which frees the slots
            closed = await asyncio.gather(*(answer_of(reader) for reader, _ in idle))
            assert all(a.startswith(b"HTTP/1.1 408 ") for a in closed)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=LIVENESS_TIMEOUT) as c:
            assert (await c.get("/healthz")).status_code == 200


async def test_keep_alive_connection_gets_a_new_header_deadline(make_app: MakeApp) -> None:
    app = make_app(workers=())
    async with guarded(app, ServerLimits(max_connections=16, header_timeout=1.0), "httptools") as port, \
            sockets(port, 1, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n") as [(reader, writer)]:
        first = await asyncio.wait_for(reader.readuntil(b'"checks":{}}'), LIVENESS_TIMEOUT)
        assert first.startswith(b"HTTP/1.1 200 ")
        writer.write(PARTIAL_HEADERS)  # the next request's headers never end
        await writer.drain()
        assert (await answer_of(reader)).startswith(b"HTTP/1.1 408 ")


async def test_a_stalled_body_gets_408_and_nothing_is_stored(make_app: MakeApp) -> None:
    app = make_app(workers=(), body_timeout=0.5)
    head = (b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n" + b'{"sender_id": "pm", ')
    async with guarded(app, ServerLimits(max_connections=16, header_timeout=5.0), "httptools") as port:
        async with sockets(port, 3, head) as stalled:
            answers = await asyncio.gather(*(answer_of(reader) for reader, _ in stalled))
        assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), answers[0]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=LIVENESS_TIMEOUT) as c:
            assert (await c.get("/v1/messages")).json()["items"] == []


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        ServerLimits(max_connections=0)
    with pytest.raises(ValueError, match="header_timeout"):
        ServerLimits(header_timeout=0)
    with pytest.raises(ValueError, match="linger"):
        ServerLimits(linger=-1)
    assert ServerLimits().max_connections >= 16


POST_HEAD = (b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
             b"Content-Length: 2\r\n\r\n")


async def write_later(writer: asyncio.StreamWriter, data: bytes, delay: float) -> None:
    """What a client does after its first bytes: a body, the rest of its headers (never fails the test)."""
    await asyncio.sleep(delay)
    with contextlib.suppress(OSError):
        writer.write(data)
        await writer.drain()


@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_a_refused_client_still_sending_reads_its_503(make_app: MakeApp, http: str) -> None:
    # A client past the cap sends a body the server never reads: closing at once made the kernel reset the
    # connection, so the client saw a read error instead of the 503 (httpx.ReadError).
    app = make_app(workers=())
    async with guarded(app, ServerLimits(max_connections=1, header_timeout=5.0), http) as port, sockets(port, 1), \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=LIVENESS_TIMEOUT) as c:
        for _ in range(3):
            answer = await c.post("/v1/messages", content=b"x" * 1_000_000)
            assert answer.status_code == 503 and answer.headers["retry-after"] == "1"


@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_a_slow_client_still_sending_reads_its_408(make_app: MakeApp, http: str) -> None:
    app = make_app(workers=())
    async with guarded(app, ServerLimits(max_connections=8, header_timeout=0.5), http) as port, \
            sockets(port, 3, PARTIAL_HEADERS) as slow:
        await asyncio.gather(*(write_later(writer, b"more\r\n", 1.0) for _, writer in slow))
        answers = await asyncio.gather(*(answer_of(reader) for reader, _ in slow))
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), answers
