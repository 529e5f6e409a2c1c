"""Two senders racing on one client-set id (issue 16 item 5): one 201, the other 409, every time."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

import httpx
import pytest

from squadbus.core.envelope import Message
from tests.service.conftest import Api, MakeApp, asgi, message

TRIALS = 15


async def race(client_a: httpx.AsyncClient, client_b: httpx.AsyncClient, path: str,
               body_a: dict[str, Any], body_b: dict[str, Any]) -> tuple[httpx.Response, httpx.Response]:
    a, b = await asyncio.gather(client_a.post(path, json=body_a), client_b.post(path, json=body_b))
    return a, b


def check_outcome(a: httpx.Response, b: httpx.Response, stored: dict[str, Any], ok: int = 201) -> str:
    """Exactly one ``ok`` and one 409; the stored message is the winner's. Returns the winner's sender."""
    assert sorted((a.status_code, b.status_code)) == [ok, 409], (a.text, b.text)
    winner = a if a.status_code == ok else b
    loser = b if winner is a else a
    assert "another sender" in loser.json()["detail"]
    won = winner.json()
    if "items" in won:
        [won] = won["items"]
    assert stored["sender_id"] == won["sender_id"]
    assert stored["content"] == won["content"]
    return str(won["sender_id"])


async def run_trials(api: Api, path: str, *, batch: bool) -> set[str]:
    # recorded where the service hands messages to the bus: the memory backend would drop a repeated id
    published: list[tuple[str, str]] = []
    bus = api.service.bus
    publish_many = bus.publish_many

    async def recording(messages: Sequence[Message]) -> Sequence[Message]:
        published.extend((str(m.id), m.sender_id) for m in messages)
        return await publish_many(messages)

    bus.publish_many = recording  # type: ignore[method-assign]
    winners: set[str] = set()
    for _ in range(TRIALS):
        ident = str(uuid.uuid4())
        body_a = message(sender="pm", id=ident, content="from pm")
        body_b = message(sender="dev-1", recipient_id="pm", id=ident, content="from dev-1")
        if batch:
            body_a, body_b = {"messages": [body_a]}, {"messages": [body_b]}
        a, b = await race(api.client, api.client, path, body_a, body_b)
        stored = (await api.client.get(f"/v1/messages/{ident}")).json()
        winner = check_outcome(a, b, stored, ok=200 if batch else 201)
        winners.add(winner)
        # the loser's message was not sent: only the winner's is on the bus
        assert [s for i, s in published if i == ident] == [winner]
    return winners


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages:batch"])
async def test_same_id_from_two_senders_at_once_sqlite(api: Api, path: str) -> None:
    await run_trials(api, path, batch=path.endswith(":batch"))


@pytest.mark.postgres
async def test_same_id_from_two_senders_at_once_postgres(make_app: MakeApp, postgres_url: str) -> None:
    async with asgi(make_app(store_url=postgres_url)) as api:
        await run_trials(api, "/v1/messages", batch=False)
        await run_trials(api, "/v1/messages:batch", batch=True)


async def test_two_replicas_racing_on_one_store_give_one_201_and_one_409(make_app: MakeApp) -> None:
    # two apps (as two replicas) on one SQLite file: no shared lock, the store write decides
    async with asgi(make_app(workers=())) as one, asgi(make_app(workers=())) as two:
        for _ in range(TRIALS):
            ident = str(uuid.uuid4())
            a, b = await race(one.client, two.client, "/v1/messages",
                              message(sender="pm", id=ident, content="from pm"),
                              message(sender="dev-1", recipient_id="pm", id=ident, content="from dev-1"))
            stored = (await one.client.get(f"/v1/messages/{ident}")).json()
            check_outcome(a, b, stored)


async def test_same_sender_racing_on_one_id_gets_201_and_200(api: Api) -> None:
    for _ in range(5):
        ident = str(uuid.uuid4())
        a, b = await race(api.client, api.client, "/v1/messages",
                          message(id=ident, content="one"), message(id=ident, content="two"))
        assert sorted((a.status_code, b.status_code)) == [200, 201], (a.text, b.text)
        assert a.json() == b.json()
