"""SSE resume over real HTTP across a server kill and restart (uvicorn child process, SQLite file store)."""

from __future__ import annotations

import uuid

import httpx
import pytest

from squadbus.testing.servers.process import kill9
from tests.service.conftest import UvicornProcess, message, read_events


async def post_batch(c: httpx.AsyncClient, url: str, execution: uuid.UUID, start: int, n: int) -> None:
    bodies = [message(execution=execution, content=f"m{i}") for i in range(start, start + n)]
    r = await c.post(url + "/v1/messages:batch", json={"messages": bodies})
    assert r.status_code == 200, r.text


@pytest.mark.slow
async def test_sse_resumes_across_kill_and_restart(uvicorn_process: UvicornProcess) -> None:
    execution = uuid.uuid4()
    events_path = f"/v1/executions/{execution}/events"
    uvicorn_process.start()
    url = uvicorn_process.url
    async with httpx.AsyncClient(timeout=15) as c:
        await post_batch(c, url, execution, 0, 6)
        async with c.stream("GET", url + events_path) as resp:
            before = await read_events(resp, 5)
            assert before[0].event == "snapshot"
            last = before[-1].id
            assert last == "4"
            kill9(uvicorn_process.proc)  # mid-stream, no graceful shutdown
            uvicorn_process.proc = None
        uvicorn_process.start()
        await post_batch(c, url, execution, 6, 4)
        async with c.stream("GET", url + events_path, headers={"Last-Event-ID": last}) as resp:
            after = await read_events(resp, 7)
            assert after[0].event == "snapshot"
            assert after[0].data["last_seq"] == 10
            await c.post(url + "/v1/messages", json=message(execution=execution, content="live after restart"))
            live = await read_events(resp, 1)
    seqs = [int(e.id or 0) for e in before[1:] + after[1:] + live]
    assert seqs == list(range(1, 12))
    contents = [e.data["content"] for e in before[1:] + after[1:] + live]
    assert contents == [f"m{i}" for i in range(10)] + ["live after restart"]
