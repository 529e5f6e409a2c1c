"""Two service replicas on one store and one bus racing on a client-set id (issue 16 item 5).

The replicas are two apps in this process, each with its own store
connections and its own per-process claims, sharing one Bus (as replicas
share a broker) and one database (a SQLite file, or PostgreSQL). Every
publish is recorded where the service hands messages to the bus, so a
message that was sent but stored nowhere shows up.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from squadbus.core.bus import Bus
from squadbus.core.envelope import Message
from squadbus.core.settings import Settings
from tests.service.conftest import Api, MakeApp, asgi, message

TRIALS = 20


@contextlib.asynccontextmanager
async def replicas(make_app: MakeApp, **overrides: Any) -> AsyncIterator[tuple[Api, Api, list[Message]]]:
    """Two apps on one Bus and one store URL; yields them and the list of every message published."""
    bus = Bus.from_settings(Settings(url="memory://"))
    await bus.start()
    published: list[Message] = []
    publish_many = bus.publish_many

    async def recording(messages: Sequence[Message]) -> Sequence[Message]:
        published.extend(messages)
        return await publish_many(messages)

    bus.publish_many = recording  # type: ignore[method-assign]
    try:
        async with asgi(make_app(bus=bus, **overrides)) as one, asgi(make_app(bus=bus, **overrides)) as two:
            yield one, two, published
    finally:
        await bus.close()


def published_for(published: list[Message], ident: str) -> list[tuple[str, str]]:
    """(sender, content) of every publish of ``ident``."""
    return [(m.sender_id, m.content) for m in published if str(m.id) == ident]


async def race_two_senders(one: Api, two: Api, published: list[Message], path: str) -> None:
    batch = path.endswith(":batch")
    for _ in range(TRIALS):
        ident = str(uuid.uuid4())
        body_a = message(sender="pm", id=ident, content="from pm")
        body_b = message(sender="dev-1", recipient_id="pm", id=ident, content="from dev-1")
        if batch:
            body_a, body_b = {"messages": [body_a]}, {"messages": [body_b]}
        a, b = await asyncio.gather(one.client.post(path, json=body_a), two.client.post(path, json=body_b))
        ok = 200 if batch else 201
        assert sorted((a.status_code, b.status_code)) == [ok, 409], (a.text, b.text)
        winner, loser = (a, b) if a.status_code == ok else (b, a)
        assert "another sender" in loser.json()["detail"]
        won = winner.json()["items"][0] if batch else winner.json()
        for replica in (one, two):
            stored = (await replica.client.get(f"/v1/messages/{ident}")).json()
            assert (stored["sender_id"], stored["content"]) == (won["sender_id"], won["content"])
        # the loser's message went nowhere: only the winner's was handed to the bus
        assert published_for(published, ident) == [(won["sender_id"], won["content"])]


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages:batch"])
async def test_two_replicas_two_senders_one_id_sqlite(make_app: MakeApp, path: str) -> None:
    async with replicas(make_app) as (one, two, published):
        await race_two_senders(one, two, published, path)


@pytest.mark.postgres
@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages:batch"])
async def test_two_replicas_two_senders_one_id_postgres(make_app: MakeApp, postgres_url: str, path: str) -> None:
    async with replicas(make_app, store_url=postgres_url) as (one, two, published):
        await race_two_senders(one, two, published, path)


async def retry_across_replicas(one: Api, two: Api) -> None:
    for _ in range(TRIALS):
        ident = str(uuid.uuid4())
        body = message(sender="pm", id=ident, content="same body")
        a, b = await asyncio.gather(one.client.post("/v1/messages", json=body),
                                    two.client.post("/v1/messages", json=body))
        # both succeed with the one stored message
        assert sorted((a.status_code, b.status_code)) == [200, 201], (a.text, b.text)
        assert a.json() == b.json()
        page = (await one.client.get("/v1/messages", params={"agent_id": "pm", "limit": 1000})).json()
        assert [m["id"] for m in page["items"]].count(ident) == 1
        # and a later retry on either replica is answered from the store
        again = await two.client.post("/v1/messages", json=body)
        assert (again.status_code, again.json()) == (200, a.json())


async def test_identical_retry_across_replicas_sqlite(make_app: MakeApp) -> None:
    async with replicas(make_app) as (one, two, _):
        await retry_across_replicas(one, two)


@pytest.mark.postgres
async def test_identical_retry_across_replicas_postgres(make_app: MakeApp, postgres_url: str) -> None:
    async with replicas(make_app, store_url=postgres_url) as (one, two, _):
        await retry_across_replicas(one, two)
