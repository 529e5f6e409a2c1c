"""SSE replay keeps a server's memory bounded when viewers connect and never read (issue 16, High 1).

The attack: an execution holds large messages and several clients open its
stream (or ``GET /v1/events``) and never read a byte. The server must stream
replay page by page and queue a bounded number of bytes per viewer; what it
used is reused by the next such wave rather than piling up. Measured on a
real server subprocess (``/proc/<pid>/status``), loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.service.conftest import MakeApp, UvicornProcess, read_events, served

MiB = 1024 * 1024
MESSAGES = 32
CONTENT_BYTES = 2_000_000
VIEWERS = 8
SETTLE = 2.0  # seconds the stuck viewers get to make the server read and queue what it will
WAVES = 2
# the documented bound (docs/service.md, "Memory of SSE replay")
PER_VIEWER_BOUND = 64 * MiB
TOTAL_BOUND = 256 * MiB
# the allocator keeps some of what it gave back; the next wave must reuse it, not add to it
AFTER_BOUND = 128 * MiB


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in bytes."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak(pid: int) -> None:
    # "5" resets VmHWM to the current RSS (Linux >= 4.0)
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _start(server: UvicornProcess) -> int:
    server.env["SQUADBUS_MAX_CONTENT_BYTES"] = str(3 * MiB)
    server.start()
    pid: int = server.proc.pid
    return pid


def _fill(url: str, execution: uuid.UUID) -> None:
    body = {"sender_id": "pm", "recipient_id": "dev-1", "task_execution_id": str(execution)}
    with httpx.Client(base_url=url, timeout=60) as client:
        for index in range(MESSAGES):
            content = f"{index:08d}" + "x" * (CONTENT_BYTES - 8)
            response = client.post("/v1/messages", json={**body, "content": content})
            assert response.status_code == 201, response.text


@contextlib.contextmanager
def _stuck_clients(port: int, path: str, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections that send a GET of ``path`` and never read the answer."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n\r\n"
                         .encode())
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def _peak_growth(pid: int, port: int, path: str) -> tuple[int, int, int]:
    """(RSS before, peak RSS growth, RSS growth after they closed) over WAVES waves of stuck viewers of ``path``."""
    before = _status(pid)["VmRSS"]
    _reset_peak(pid)
    for _ in range(WAVES):
        with _stuck_clients(port, path, VIEWERS):
            time.sleep(SETTLE)
        time.sleep(0.5)  # the server notices the closed sockets on its next write or heartbeat
    peak = _status(pid)["VmHWM"]
    after = _status(pid)["VmRSS"]
    return before, peak - before, after - before


def _read_all(url: str, path: str, last_id: str) -> list[str]:
    """The ids of message events a reading client gets from ``path`` until id ``last_id``."""
    ids: list[str] = []
    with httpx.Client(base_url=url, timeout=60) as client, client.stream("GET", path) as response:
        assert response.status_code == 200
        event, ident = "", ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("id: "):
                ident = line[4:]
            elif line == "" and event:
                if event == "message":
                    ids.append(ident)
                    if ident == last_id:
                        return ids
                event = ""
    return ids


def test_stuck_execution_viewers_keep_memory_bounded(uvicorn_process: UvicornProcess) -> None:
    pid = _start(uvicorn_process)
    execution = uuid.uuid4()
    _fill(uvicorn_process.url, execution)
    path = f"/v1/executions/{execution}/events"

    before, peak, after = _peak_growth(pid, uvicorn_process.port, path)

    assert peak < TOTAL_BOUND, f"RSS {before // MiB} MiB grew by {peak // MiB} MiB with {VIEWERS} stuck viewers"
    assert peak < VIEWERS * PER_VIEWER_BOUND
    assert after < AFTER_BOUND, f"RSS still {after // MiB} MiB above {before // MiB} MiB after {WAVES} waves left"
    # a reading viewer still gets every message, in order
    ids = _read_all(uvicorn_process.url, path, str(MESSAGES))
    assert ids == [str(seq) for seq in range(1, MESSAGES + 1)]


def test_stuck_squad_watchers_keep_memory_bounded(uvicorn_process: UvicornProcess) -> None:
    pid = _start(uvicorn_process)
    _fill(uvicorn_process.url, uuid.uuid4())

    before, peak, after = _peak_growth(pid, uvicorn_process.port, "/v1/events")

    assert peak < TOTAL_BOUND, f"RSS {before // MiB} MiB grew by {peak // MiB} MiB with {VIEWERS} stuck watchers"
    assert after < AFTER_BOUND, f"RSS still {after // MiB} MiB above {before // MiB} MiB after {WAVES} waves left"
    ids = _read_all(uvicorn_process.url, "/v1/events", str(MESSAGES))
    assert len(ids) == MESSAGES


async def test_a_viewer_that_stops_reading_is_dropped_and_resumes(make_app: MakeApp) -> None:
    app = make_app(sse_send_timeout=0.5, max_content_bytes=3 * MiB)
    execution = uuid.uuid4()
    loop = asyncio.get_running_loop()
    async with served(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        body = {"sender_id": "pm", "recipient_id": "dev-1", "task_execution_id": str(execution)}
        for index in range(8):  # more than the socket buffers between the server and a client that never reads
            response = await client.post("/v1/messages", json={**body, "content": f"{index}" * CONTENT_BYTES})
            assert response.status_code == 201
        hub = app.state.service.hub
        port = int(url.rsplit(":", 1)[1])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, f"GET /v1/executions/{execution}/events HTTP/1.1\r\n"
                                          f"Host: 127.0.0.1:{port}\r\n\r\n".encode())
            for _ in range(200):
                if hub.viewer_count == 1:
                    break
                await asyncio.sleep(0.05)
            assert hub.viewer_count == 1
            for _ in range(400):  # dropped by the server while the client still holds its socket
                if hub.viewer_count == 0:
                    break
                await asyncio.sleep(0.05)
            assert hub.viewer_count == 0
            received = bytearray()
            while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 10):
                received += chunk
        finally:
            sock.close()
        complete = bytes(received).rsplit(b"\n\n", 1)[0]
        last_id = [line[4:].decode() for line in complete.split(b"\n") if line.startswith(b"id: ")][-1]
        assert 1 <= int(last_id) < 8
        async with client.stream("GET", f"/v1/executions/{execution}/events",
                                 headers={"Last-Event-ID": last_id}) as response:
            events = await read_events(response, 1 + 8 - int(last_id))
        assert [e.id for e in events[1:]] == [str(seq) for seq in range(int(last_id) + 1, 9)]
