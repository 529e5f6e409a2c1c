"""/readyz: a real round trip to the bus backend and to the store, each under a timeout, naming what is not ready."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any
from uuid import UUID

import pytest

from squadbus.core.envelope import Message
from squadbus.core.errors import ConnectionLost
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
