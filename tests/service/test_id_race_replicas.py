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
from squadbus.core.errors import PublishFailed
from squadbus.core.settings import Settings
from squadbus.service.id_claims import fingerprint
from squadbus.service.routes_messages import to_message
from squadbus.service.schemas import MessageIn
from squadbus.store import ClaimsIds, HistoryStore, IdClaim, open_store
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


# ---- claims that outlive their request ----------------------------------------------------------


async def claim_as_a_crashed_replica(api: Api, body: dict[str, Any]) -> None:
    """Claim ``body``'s id in the store for it, as a replica that died before publishing would have."""
    store = api.service.store
    assert isinstance(store, ClaimsIds)
    sent = to_message(MessageIn(**body), api.service)
    [held] = await store.claim([IdClaim(sent.id, sent.sender_id, fingerprint(sent))])
    assert held.sender_id == body["sender_id"]


async def test_a_claim_left_by_a_crash_lets_the_same_message_through_and_no_other(make_app: MakeApp) -> None:
    async with replicas(make_app) as (one, two, published):
        ident = str(uuid.uuid4())
        body = message(sender="pm", id=ident, content="sent after a crash")
        await claim_as_a_crashed_replica(one, body)
        other = await two.client.post("/v1/messages", json=message(sender="dev-1", id=ident, content="mine"))
        assert other.status_code == 409
        assert "another sender" in other.json()["detail"]
        changed = await two.client.post("/v1/messages", json={**body, "content": "changed"})
        assert changed.status_code == 409
        assert "not stored yet" in changed.json()["detail"]
        retry = await two.client.post("/v1/messages", json=body)
        assert retry.status_code == 201, retry.text
        assert published_for(published, ident) == [("pm", "sent after a crash")]
        # once stored, the same sender's other message under the id gets the stored one, as before
        again = await one.client.post("/v1/messages", json={**body, "content": "changed"})
        assert (again.status_code, again.json()) == (200, retry.json())


async def test_a_failed_publish_keeps_the_claim_for_its_retry(make_app: MakeApp) -> None:
    async with replicas(make_app) as (one, two, published):
        bus = one.service.bus
        recording = bus.publish_many
        failures = [PublishFailed("broker down")]

        async def failing_once(messages: Sequence[Message]) -> Sequence[Message]:
            if failures:
                raise failures.pop()
            return await recording(messages)

        bus.publish_many = failing_once  # type: ignore[method-assign]
        ident = str(uuid.uuid4())
        body = message(sender="pm", id=ident, content="first try fails")
        first = await one.client.post("/v1/messages", json=body)
        assert first.status_code == 503
        assert (await two.client.get(f"/v1/messages/{ident}")).status_code == 404
        # the id stays claimed for pm's message: another sender is refused, pm's retry goes through
        other = await two.client.post("/v1/messages", json=message(sender="dev-1", id=ident))
        assert other.status_code == 409
        retry = await two.client.post("/v1/messages", json=body)
        assert retry.status_code == 201, retry.text
        assert published_for(published, ident) == [("pm", "first try fails")]


async def test_a_refused_batch_sends_and_claims_nothing(make_app: MakeApp) -> None:
    async with replicas(make_app) as (one, two, published):
        taken, free = str(uuid.uuid4()), str(uuid.uuid4())
        await claim_as_a_crashed_replica(one, message(sender="pm", id=taken))
        batch = {"messages": [message(sender="dev-1", id=free, content="a"),
                              message(sender="dev-1", id=taken, content="b")]}
        refused = await two.client.post("/v1/messages:batch", json=batch)
        assert refused.status_code == 409
        assert published_for(published, free) == published_for(published, taken) == []
        # ``free`` was not claimed for dev-1's refused batch: pm may use it
        ok = await one.client.post("/v1/messages", json=message(sender="pm", id=free, content="pm's"))
        assert ok.status_code == 201, ok.text


async def test_batch_retry_across_replicas_stores_each_message_once(make_app: MakeApp) -> None:
    async with replicas(make_app) as (one, two, _):
        execution = uuid.uuid4()
        bodies = [message(sender="pm", execution=execution, id=str(uuid.uuid4()), content=f"m{i}") for i in range(20)]
        a, b = await asyncio.gather(one.client.post("/v1/messages:batch", json={"messages": bodies}),
                                    two.client.post("/v1/messages:batch", json={"messages": bodies}))
        assert (a.status_code, b.status_code) == (200, 200), (a.text, b.text)
        assert a.json() == b.json()
        page = (await one.client.get("/v1/messages", params={"task_execution_id": str(execution)})).json()
        assert [m["content"] for m in page["items"]] == [f"m{i}" for i in range(20)]
        assert [m["seq"] for m in page["items"]] == list(range(1, 21))


class UnclaimingStore:
    """A HistoryStore that does not claim ids (delegates everything else to ``inner``)."""

    def __init__(self, inner: HistoryStore) -> None:
        self.inner = inner
        self.url = inner.url
        self.open, self.close, self.write, self.get = inner.open, inner.close, inner.write, inner.get
        self.query, self.after, self.snapshot = inner.query, inner.after, inner.snapshot
        self.delete_older_than, self.ping = inner.delete_older_than, inner.ping

    async def __aenter__(self) -> UnclaimingStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def test_a_store_without_claims_keeps_todays_answers(make_app: MakeApp, store_url: str) -> None:
    store = UnclaimingStore(open_store(store_url))
    assert isinstance(store, HistoryStore)
    assert not isinstance(store, ClaimsIds)
    try:
        async with asgi(make_app(store=store)) as api:
            ident = str(uuid.uuid4())
            first = await api.client.post("/v1/messages", json=message(id=ident))
            again = await api.client.post("/v1/messages", json=message(id=ident))
            other = await api.client.post("/v1/messages", json=message(sender="dev-1", id=ident))
            assert (first.status_code, again.status_code, other.status_code) == (201, 200, 409)
            assert again.json() == first.json()
    finally:
        await store.close()
