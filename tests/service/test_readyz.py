"""/readyz: a real round trip to the bus backend and to the store, each under a timeout, naming what is not ready."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from squadbus.core.envelope import Message
from squadbus.core.errors import ConnectionLost
from squadbus.testing.servers.kafka import TansuServer
from squadbus.testing.servers.nats import NatsServer
from squadbus.testing.servers.redis import RedisServer
from tests.service.conftest import MakeApp, asgi


async def test_ready_when_both_answer(make_app: MakeApp) -> None:
    calls: list[UUID] = []
    async with asgi(make_app(workers=())) as running:
        backend = running.service.bus.backend
        real = backend.replay

        def counting(task_execution_id: UUID, **kw: Any) -> AsyncIterator[tuple[int, Message]]:
            calls.append(task_execution_id)
            return real(task_execution_id, **kw)

        backend.replay = counting  # type: ignore[method-assign]
        r = await running.client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "checks": {"store": "ok", "bus": "ok"}}
    assert len(calls) == 1  # the bus check reached the backend


async def test_backend_that_fails_its_round_trip_is_not_ready(make_app: MakeApp) -> None:
    async def lost(task_execution_id: UUID, *, from_seq: int = 0,
                   since: datetime | None = None) -> AsyncIterator[tuple[int, Message]]:
        raise ConnectionLost("broker went away")
        yield  # an async generator, like the real replay

    async with asgi(make_app(workers=())) as running:
        running.service.bus.backend.replay = lost  # type: ignore[method-assign]
        r = await running.client.get("/readyz")
    assert r.status_code == 503
    checks = r.json()["checks"]
    assert checks["store"] == "ok"
    assert "broker went away" in checks["bus"]


async def test_backend_that_hangs_is_not_ready_after_the_timeout(make_app: MakeApp) -> None:
    async def hang(task_execution_id: UUID, *, from_seq: int = 0,
                   since: datetime | None = None) -> AsyncIterator[tuple[int, Message]]:
        await asyncio.Event().wait()
        yield (0, None)  # type: ignore[misc]  # never reached

    async with asgi(make_app(workers=(), readiness_timeout=0.2)) as running:
        running.service.bus.backend.replay = hang  # type: ignore[method-assign]
        r = await asyncio.wait_for(running.client.get("/readyz"), 10)
    assert r.status_code == 503
    assert "timed out" in r.json()["checks"]["bus"]
    assert r.json()["checks"]["store"] == "ok"


async def test_store_that_hangs_is_not_ready_after_the_timeout(make_app: MakeApp,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    async with asgi(make_app(workers=(), readiness_timeout=0.2)) as running:
        monkeypatch.setattr(running.service.store, "ping", asyncio.Event().wait)
        r = await asyncio.wait_for(running.client.get("/readyz"), 10)
    assert r.status_code == 503
    assert r.json()["checks"] == {"store": "unavailable: timed out after 0.2 s", "bus": "ok"}


async def test_closed_bus_is_not_ready(make_app: MakeApp) -> None:
    async with asgi(make_app(workers=())) as running:
        await running.service.bus.close()
        r = await running.client.get("/readyz")
    assert r.status_code == 503
    assert "closed" in r.json()["checks"]["bus"]


async def ready_then_not_then_ready(make_app: MakeApp, url: str, stop: Callable[[], object],
                                    start: Callable[[], object]) -> None:
    """Ready while the broker runs; ``bus`` not ready (within the timeout) while it is down; ready once it is back."""
    async with asgi(make_app(url=url, workers=(), readiness_timeout=3.0)) as running:
        r = await running.client.get("/readyz")
        assert (r.status_code, r.json()["checks"]) == (200, {"store": "ok", "bus": "ok"})
        stop()
        r = await asyncio.wait_for(running.client.get("/readyz"), 20)
        assert r.status_code == 503
        checks = r.json()["checks"]
        assert checks["store"] == "ok" and checks["bus"].startswith("unavailable"), checks
        start()
        for _ in range(100):
            if (await running.client.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.2)
        assert (await running.client.get("/readyz")).json()["checks"]["bus"] == "ok"


@pytest.mark.redis
async def test_readyz_round_trip_on_redis(make_app: MakeApp) -> None:
    with RedisServer("durable") as server:
        await ready_then_not_then_ready(make_app, server.url, server.stop, server.start)


@pytest.mark.nats
async def test_readyz_round_trip_on_nats(make_app: MakeApp, tmp_path: Path) -> None:
    with NatsServer(tmp_path / "nats") as server:
        await ready_then_not_then_ready(make_app, server.url, server.stop, server.start)


@pytest.mark.kafka
async def test_readyz_round_trip_on_kafka(make_app: MakeApp) -> None:
    with TansuServer() as server:
        await ready_then_not_then_ready(make_app, f"{server.url}?partitions=2&idempotence=off", server.stop,
                                        server.start)
