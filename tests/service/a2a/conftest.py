"""A real ``squadbus serve`` (uvicorn child process) on Redis with a SQLite file, and squad agents on the same Redis.

The agents run in the test process on their own Bus: with Redis as the bus,
an agent anywhere reaches the served edge, as in production.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from squadbus.core.bus import Bus
from squadbus.testing.servers.process import free_port
from tests.redis.conftest import redis_server, redis_url  # the session's redis-server
from tests.service.a2a.agents import run_agents
from tests.service.conftest import TOKENS, UvicornProcess

__all__ = ["redis_server", "redis_url"]


@pytest.fixture
def edge(tmp_path: Path, redis_url: str) -> Iterator[UvicornProcess]:
    """``squadbus serve`` on Redis, a SQLite file and the test tokens; started, always stopped after."""
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": list(TOKENS.values())}))
    env = {**os.environ, "SQUADBUS_URL": redis_url,
           "SQUADBUS_STORE_URL": f"sqlite+aiosqlite:///{tmp_path / 'served.db'}",
           "SQUADBUS_TOKENS_FILE": str(tokens)}
    server = UvicornProcess(free_port(), env, tmp_path / "uvicorn.log")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
async def squad(edge: UvicornProcess, redis_url: str) -> AsyncIterator[Bus]:
    """The test agents (echo, asker, slow) on the edge's Redis, declared A2A-reachable and visible on the card."""
    async with Bus.from_url(redis_url) as bus:
        await run_agents(bus)
        async with httpx.AsyncClient(timeout=10) as c:
            for _ in range(500):  # the db-writer stores the registrations within milliseconds
                card = (await c.get(edge.url + "/.well-known/agent-card.json")).json()
                if len(card["skills"]) == 3:
                    break
                await asyncio.sleep(0.02)
        yield bus
