"""SSE fan-out benchmark: many concurrent viewers of a running ``squadbus serve``, against a bare SSE server.

``run(url=SERVE_URL, count=N, rate=R, viewers=V, executions=E)`` connects V
SSE viewers spread evenly over E executions, waits until every one has its
``snapshot``, then POSTs N messages to ``/v1/messages`` at R per second
(open loop, round-robin over the executions), and measures for every
(viewer, message) pair the time from the message's *intended* send time to
its arrival at the viewer. Every viewer must receive every message of its
execution exactly once, in seq order; misses, duplicates and seq breaks are
counted and reported in the result notes.

With ``raw_url`` (a server started by :func:`serve_raw`) the same viewers and
load run against a bare asyncio SSE server that fans each POSTed body out to
its subscribers' sockets with no store, no bus and no validation: the floor
of this machine, the "raw client" line. Viewers and the publisher are raw
asyncio sockets (HTTP/1.1, chunked), so the client side costs little CPU.

Run the server as a separate process (``bench/bench_sse.py`` does both).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from squadbus.benchmarks.openloop import drive
from squadbus.benchmarks.stats import Result
from squadbus.core.tasks import cancel_and_wait

_INDEX = re.compile(rb'"content":"bench-(\d+)"')
_RAW_INDEX = re.compile(rb"bench-(\d+)")
_ID = re.compile(rb"^id: (\d+)$", re.MULTILINE)
SETTLE_SECONDS = 15.0


@dataclass(slots=True)
class ViewerState:
    """What one viewer received."""

    execution: str
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    received: list[int] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    expected: int = 0


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, bool, int]:
    """Status, whether the body is chunked, and its Content-Length (0 when absent)."""
    status_line = await reader.readline()
    parts = status_line.split()
    if len(parts) < 2:
        raise ConnectionError(f"bad status line {status_line!r}")
    length = 0
    chunked = False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        lower = line.lower()
        if lower.startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
        elif lower.startswith(b"transfer-encoding:") and b"chunked" in lower:
            chunked = True
    return int(parts[1]), chunked, length


async def _chunks(reader: asyncio.StreamReader, chunked: bool) -> AsyncIterator[bytes]:
    while True:
        if not chunked:
            data = await reader.read(65536)
            if not data:
                return
            yield data
            continue
        size_line = await reader.readline()
        if not size_line:
            return
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        data = await reader.readexactly(size + 2)
        yield data[:-2]


async def _viewer(host: str, port: int, path: str, state: ViewerState, due: dict[int, float],
                  latencies: list[float], *, raw: bool) -> None:
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 22)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode())
        status, chunked, _ = await _read_head(reader)
        if status != 200:
            raise ConnectionError(f"GET {path}: HTTP {status}")
        index_re = _RAW_INDEX if raw else _INDEX
        buffer = b""
        async for data in _chunks(reader, chunked):
            now = time.perf_counter()
            buffer += data
            end = buffer.rfind(b"\n\n")
            if end < 0:
                continue
            block, buffer = buffer[: end + 2], buffer[end + 2:]
            if not state.ready.is_set() and (b"event: snapshot" in block or b": ready" in block):
                state.ready.set()
            for match in index_re.finditer(block):
                i = int(match.group(1))
                state.received.append(i)
                latencies.append(now - due.get(i, now))
            if not raw:
                state.seqs.extend(int(m.group(1)) for m in _ID.finditer(block))
            if state.expected and len(state.received) >= state.expected:
                state.done.set()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class _Poster:
    """A pool of keep-alive HTTP/1.1 connections for POSTs (raw sockets, one request in flight each)."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.host, self.port, self.size = host, port, size
        self._idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
        self._all: list[asyncio.StreamWriter] = []
        self.errors = 0

    async def open(self) -> None:
        for _ in range(self.size):
            reader, writer = await asyncio.open_connection(self.host, self.port)
            self._all.append(writer)
            self._idle.put_nowait((reader, writer))

    async def post(self, path: str, body: bytes) -> int:
        reader, writer = await self._idle.get()
        try:
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode() + body
            )
            return await _read_response(reader)
        finally:
            self._idle.put_nowait((reader, writer))

    async def close(self) -> None:
        for writer in self._all:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one whole response (keep-alive); its status."""
    status, chunked, length = await _read_head(reader)
    if chunked:
        async for _ in _chunks(reader, True):
            pass
        await reader.readline()
    elif length:
        await reader.readexactly(length)
    return status


async def _measure(
    *, name: str, base: str, count: int, rate: float, viewers: int, executions: int, raw: bool,
    connections: int = 32,
) -> Result:
    parts = urlsplit(base)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    exec_ids = [str(uuid.uuid4()) for _ in range(executions)]
    due: dict[int, float] = {}
    latencies: list[float] = []
    states = [ViewerState(exec_ids[v % executions]) for v in range(viewers)]
    per_execution = [count // executions + (1 if e < count % executions else 0) for e in range(executions)]
    for v, state in enumerate(states):
        state.expected = per_execution[v % executions]
    tasks = []
    for state in states:
        path = f"/e/{state.execution}" if raw else f"/v1/executions/{state.execution}/events"
        tasks.append(asyncio.create_task(_viewer(host, port, path, state, due, latencies, raw=raw)))
        if len(tasks) % 100 == 0:
            await asyncio.sleep(0.05)  # do not flood the accept queue
    poster = _Poster(host, port, connections)
    try:
        await asyncio.wait_for(asyncio.gather(*(s.ready.wait() for s in states)), 120)
        await poster.open()
        statuses: list[int] = []

        async def send(i: int, when: float) -> None:
            execution = exec_ids[i % executions]
            due[i] = when
            if raw:
                status = await poster.post(f"/m/{execution}", b"bench-%d" % i)
            else:
                body = json.dumps({"sender_id": "bench", "recipient_id": "viewer", "content": f"bench-{i}",
                                   "message_type": "bench", "task_execution_id": execution}).encode()
                status = await poster.post("/v1/messages", body)
            statuses.append(status)

        started = time.perf_counter()
        sent_for = await drive(rate, count, send)
        pending = [s.done.wait() for s in states if s.expected]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*pending), SETTLE_SECONDS)
        elapsed = time.perf_counter() - started
    finally:
        with contextlib.suppress(Exception):  # a viewer's own failure is counted as its misses, not raised
            await cancel_and_wait(*tasks)
        await poster.close()
    failed_posts = sum(1 for s in statuses if s >= 300)
    missed = duplicated = broken = 0
    for v, state in enumerate(states):
        expected = set(range(v % executions, count, executions))
        got = state.received
        missed += len(expected - set(got))
        duplicated += len(got) - len(set(got))
        if not raw and state.seqs != list(range(1, len(state.seqs) + 1)):
            broken += 1
    notes = (f"viewers={viewers} executions={executions} fan-out={viewers // executions}/msg "
             f"sent_in={sent_for:.1f}s missed={missed} dup={duplicated} seq_breaks={broken} "
             f"post_errors={failed_posts}")
    return Result(name=name, count=len(latencies), seconds=elapsed,
                  latencies_ms=[x * 1000 for x in latencies], notes=notes)


async def run(*, url: str, count: int, rate: float, viewers: int = 1000, executions: int = 100,
              raw_url: str | None = None) -> list[Result]:
    """Measure ``squadbus serve`` at ``url`` (and the bare server at ``raw_url`` when given)."""
    if viewers < executions or executions < 1:
        raise ValueError("need viewers >= executions >= 1")
    results = [await _measure(name="squadbus serve SSE", base=url, count=count, rate=rate, viewers=viewers,
                              executions=executions, raw=False)]
    if raw_url:
        results.append(await _measure(name="raw asyncio SSE fan-out", base=raw_url, count=count, rate=rate,
                                      viewers=viewers, executions=executions, raw=True))
    return results


# ---- the bare SSE server (baseline) ---------------------------------------------------------------


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _raw_handler() -> Handler:
    subscribers: dict[str, set[asyncio.StreamWriter]] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await reader.readline()
                if not request:
                    return
                method, path, _ = request.decode().split(" ", 2)
                length = 0
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b""):
                        break
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                if method == "GET" and path.startswith("/e/"):
                    execution = path[3:]
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n" + _chunk(b": ready\n\n"))
                    subscribers.setdefault(execution, set()).add(writer)
                    try:
                        await reader.read()  # until the viewer goes away
                    finally:
                        subscribers[execution].discard(writer)
                    return
                if method == "POST" and path.startswith("/m/"):
                    frame = _chunk(b"event: message\ndata: " + body + b"\n\n")
                    for sub in subscribers.get(path[3:], ()):
                        sub.write(frame)
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    continue
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            writer.close()

    return handle


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def serve_raw(port: int, *, host: str = "127.0.0.1", stop: asyncio.Event | None = None) -> None:
    """Run the bare SSE fan-out server until ``stop`` is set (forever when None)."""
    server = await asyncio.start_server(_raw_handler(), host, port, backlog=4096)
    async with server:
        await (stop or asyncio.Event()).wait()


if __name__ == "__main__":  # python -m squadbus.benchmarks.sse PORT: the baseline server for bench/bench_sse.py
    import sys

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_raw(int(sys.argv[1])))
