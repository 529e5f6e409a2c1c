"""``squadbus serve`` stops at once with SSE streams open: each stream ends cleanly, nothing waits out the grace.

uvicorn's graceful shutdown waits up to 10 s for open responses to finish; an
SSE stream never finishes by itself, so before the fix a viewer's open tab
held every stop (Ctrl-C, SIGTERM) for the whole 10 s.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from squadbus.service.sse_hub import SseHub, ViewerStream
from squadbus.store.base import open_store
from squadbus.testing.servers.process import free_port, port_open, spawn, stop, wait_until
from tests.service.conftest import message, read_events

EXIT_WITHIN = 5.0
"""Half of ``squadbus serve``'s graceful shutdown timeout (10 s)."""


class Serve:
    """``squadbus serve`` (memory bus, SQLite file store, open on loopback) as a child process."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.log = directory / "serve.log"
        argv = [sys.executable, "-m", "squadbus", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--url", "memory://", "--store", f"sqlite+aiosqlite:///{directory / 'history.db'}",
                "--log-level", "info"]
        env = {**os.environ, "SQUADBUS_DATA_DIR": str(directory)}
        env.pop("SQUADBUS_TOKENS_FILE", None)
        self.proc: subprocess.Popen[bytes] = spawn(argv, self.log, env=env)

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        """``/readyz`` answers 200."""
        return httpx.get(self.url + "/readyz", timeout=2).status_code == 200


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    """A ready ``squadbus serve``, always stopped by PID after the test."""
    served = Serve(tmp_path)
    try:
        wait_until(lambda: port_open(served.port) and served.ready(), 30, f"squadbus serve (log {served.log})",
                   served.proc)
        yield served
    finally:
        stop(served.proc)


async def read_to_end(response: httpx.Response) -> list[str]:
    """The rest of the stream's lines; raises if the stream is cut instead of ended."""
    lines = getattr(response, "_sse_lines", None) or response.aiter_lines()
    return [line async for line in lines]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_stop_ends_open_sse_streams_at_once(serve: Serve, sig: signal.Signals) -> None:
    execution = uuid.uuid4()
    async with httpx.AsyncClient(base_url=serve.url, timeout=15) as c:
        r = await c.post("/v1/messages", json=message(execution=execution, content="before stop"))
        assert r.status_code in (200, 201), r.text
        async with c.stream("GET", f"/v1/executions/{execution}/events") as one, \
                c.stream("GET", "/v1/events") as squad:
            (snapshot, first) = await read_events(one, 2)
            assert (snapshot.event, first.id, first.data["content"]) == ("snapshot", "1", "before stop")
            (start, stored) = await read_events(squad, 2)
            assert (start.event, stored.data["content"]) == ("start", "before stop")

            serve.proc.send_signal(sig)
            async with asyncio.timeout(EXIT_WITHIN):  # well inside the graceful timeout: nothing waited it out
                # both streams end with the chunked terminator (a cut connection raises RemoteProtocolError)
                rest = await read_to_end(one) + await read_to_end(squad)
                while serve.proc.poll() is None:
                    await asyncio.sleep(0.05)
            assert not [line for line in rest if line.startswith(("id:", "data:"))]
    log = serve.log.read_text()
    assert "timeout graceful shutdown exceeded" not in log, log
    assert "Traceback" not in log, log


async def test_ended_stream_sends_what_it_holds_first(tmp_path: Path) -> None:
    store = open_store(f"sqlite+aiosqlite:///{tmp_path / 'h.db'}")
    await store.open()
    hub = SseHub(store)
    try:
        execution = uuid.uuid4()
        viewer = await hub.join(execution)
        stream = ViewerStream(hub, viewer, after=0, heartbeat=60)
        frames = stream.frames()
        heartbeat_or_live = asyncio.ensure_future(anext(frames))  # caught up (nothing stored), waiting live
        await asyncio.sleep(0.05)
        assert not heartbeat_or_live.done()
        viewer.push(1, b"id: 1\n\n")
        assert await heartbeat_or_live == b"id: 1\n\n"
        viewer.push(2, b"id: 2\n\n")
        viewer.push(3, b"id: 3\n\n")
        hub.end_streams()
        assert [chunk async for chunk in frames] == [b"id: 2\n\nid: 3\n\n"]
        hub.leave(viewer)
        later = ViewerStream(hub, await hub.join(execution), after=0, heartbeat=60)
        assert [chunk async for chunk in later.frames()] == []  # opened while stopping: ends at once
    finally:
        await hub.close()
        await store.close()
