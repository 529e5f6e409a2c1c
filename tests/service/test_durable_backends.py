"""The same service code on durable backends: Redis Streams and NATS JetStream (private servers)."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest

from squadbus.testing.servers.nats import NatsServer
from squadbus.testing.servers.redis import RedisServer
from tests.service.conftest import MakeApp, message, read_events, served


async def exercise(make_app: MakeApp, backend_url: str) -> None:
    execution = uuid.uuid4()
    app = make_app(url=backend_url)
    async with served(app) as url, httpx.AsyncClient(base_url=url, timeout=20) as c:
        assert (await c.get("/readyz")).status_code == 200
        first = await c.post("/v1/messages", json=message(execution=execution, content="over http"))
        assert first.status_code == 201 and first.json()["seq"] == 1
        async with c.stream("GET", f"/v1/executions/{execution}/events") as resp:
            events = await read_events(resp, 2)
            assert events[1].data["content"] == "over http"
            # published by an agent straight on the bus: stored by the db-writer, then shown
            await app.state.service.bus.send("dev-1", "pm", "over the bus", task_execution_id=execution)
            live = await read_events(resp, 1)
        assert (live[0].id, live[0].data["content"]) == ("2", "over the bus")
        metrics = (await c.get("/metrics")).text
        backend = app.state.service.bus.backend.name
        assert f'squadbus_messages_published_total{{backend="{backend}",message_type="message"}} 1.0' in metrics


@pytest.mark.redis
async def test_service_on_redis(make_app: MakeApp) -> None:
    with RedisServer("durable") as server:
        await exercise(make_app, server.url)


@pytest.mark.nats
async def test_service_on_nats(make_app: MakeApp, tmp_path: Path) -> None:
    with NatsServer(tmp_path / "nats") as server:
        await exercise(make_app, server.url)
