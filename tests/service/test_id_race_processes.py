"""Two ``uvicorn squadbus.service:create_app`` processes on one Redis and one SQLite file racing on ids.

Issue 16 item 5 across real replicas: every message either replica hands to
Redis is seen by a fan-out subscriber of this test. The one delivered under
each id must be the one answered 201 and stored: when both replicas
published, Redis kept whichever came first (it drops a repeated id), which
was often not the message the store kept.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from squadbus.core.backend import Delivery
from squadbus.core.bus import Bus
from squadbus.core.envelope import Message
from squadbus.testing.servers.process import free_port
from squadbus.testing.servers.redis import RedisServer
from tests.service.conftest import UvicornProcess, message

pytestmark = pytest.mark.redis

TRIALS = 20



@pytest.fixture
def replica_processes(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[UvicornProcess, UvicornProcess]]:
    """Two started service processes on one Redis key prefix and one SQLite file; stopped after."""
    env = {**os.environ, "SQUADBUS_URL": f"{redis_server.url}?prefix=t{uuid.uuid4().hex[:10]}",
           "SQUADBUS_STORE_URL": f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"}
    env.pop("SQUADBUS_TOKENS_FILE", None)
    started: list[UvicornProcess] = []
    try:
        for name in ("one", "two"):
            (tmp_path / name).mkdir()
            server = UvicornProcess(free_port(), env, tmp_path / name / "uvicorn.log")
            started.append(server)
            server.start()
        yield started[0], started[1]
    finally:
        for server in started:
            server.stop()


async def wait_for(seen: list[Message], contents: set[str]) -> None:
    async def go() -> None:
        while not contents <= {m.content for m in seen}:
            await asyncio.sleep(0.05)

    await asyncio.wait_for(go(), 30)


async def test_two_processes_two_senders_one_id(replica_processes: tuple[UvicornProcess, UvicornProcess]) -> None:
    one, two = replica_processes
    seen: list[Message] = []

    async def record(delivery: Delivery) -> None:
        seen.append(delivery.message)

    async with (
        Bus.from_url(one.env["SQUADBUS_URL"]) as bus,
        httpx.AsyncClient(base_url=one.url, timeout=30) as c1,
        httpx.AsyncClient(base_url=two.url, timeout=30) as c2,
    ):
        await bus.subscribe("agent.message.>", record)
        # the subscriber is reading once it sees a message sent after it started
        assert (await c1.post("/v1/messages", json=message(content="warm-up"))).status_code == 201
        await wait_for(seen, {"warm-up"})
        winners: dict[str, tuple[str, str]] = {}
        for _ in range(TRIALS):
            ident = str(uuid.uuid4())
            a, b = await asyncio.gather(
                c1.post("/v1/messages", json=message(sender="pm", id=ident, content=f"pm {ident}")),
                c2.post("/v1/messages", json=message(sender="dev-1", id=ident, content=f"dev-1 {ident}")),
            )
            assert sorted((a.status_code, b.status_code)) == [201, 409], (a.text, b.text)
            won = (a if a.status_code == 201 else b).json()
            stored = (await c2.get(f"/v1/messages/{ident}")).json()
            assert (stored["sender_id"], stored["content"]) == (won["sender_id"], won["content"])
            winners[ident] = (won["sender_id"], won["content"])
        # both replicas publish a last message to the same recipient: once both are seen, so is all before
        for client, name in ((c1, "last from one"), (c2, "last from two")):
            assert (await client.post("/v1/messages", json=message(content=name))).status_code == 201
        await wait_for(seen, {"last from one", "last from two"})
    for ident, winner in winners.items():
        assert [(m.sender_id, m.content) for m in seen if str(m.id) == ident] == [winner]
