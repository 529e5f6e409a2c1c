"""The A2A edge under test, two ways.

* ``edge`` / ``squad``: a real ``squadbus serve`` (uvicorn child process) on
  Redis with a SQLite file, and squad agents on the same Redis. The agents run
  in the test process on their own Bus: with Redis as the bus, an agent
  anywhere reaches the served edge, as in production.
* ``inproc``: the service in this process (uvicorn, memory bus, SQLite file,
  the test tokens, webhooks allowed on loopback, a fast push backoff) with
  the agents on its bus: for what does not depend on the backend.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from squadbus.core.bus import Bus
from squadbus.core.settings import Settings
from squadbus.service import ServiceOptions, create_app
from squadbus.service.a2a.routes import install
from squadbus.service.a2a.tasks import EdgeOptions
from squadbus.testing.servers.process import free_port
from tests.service.a2a.agents import run_agents
from tests.service.conftest import TOKENS, UvicornProcess, served


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


@dataclass
class InProcess:
    """The in-process edge: its base URL and app (``app.state.service`` is the running Service)."""

    url: str
    app: FastAPI


async def wait_for_agents(url: str, count: int = 3) -> None:
    """Until the squad card lists the test agents' skills (the db-writer stores the registrations)."""
    async with httpx.AsyncClient(timeout=10) as c:
        for _ in range(500):
            if len((await c.get(url + "/.well-known/agent-card.json")).json()["skills"]) == count:
                return
            await asyncio.sleep(0.02)
    raise AssertionError("the agents never reached the squad card")


@pytest.fixture
async def inproc(tmp_path: Path) -> AsyncIterator[InProcess]:
    """The edge in this process with the test tokens and the test agents (see the module docstring)."""
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": list(TOKENS.values())}))
    settings = Settings(store_url=f"sqlite+aiosqlite:///{tmp_path / 'edge.db'}", a2a=False,
                        tokens_file=str(tokens), a2a_webhook_allow=("127.0.0.1",))
    app = create_app(settings, options=ServiceOptions(audit_path=str(tmp_path / "audit.jsonl"), heartbeat=0.5,
                                                      poll_interval=0.5))
    install(app, EdgeOptions(push_attempts=3, push_backoff_base=0.05, push_backoff_max=0.2))
    async with served(app) as url:
        await run_agents(app.state.service.bus)
        await wait_for_agents(url)
        yield InProcess(url, app)
