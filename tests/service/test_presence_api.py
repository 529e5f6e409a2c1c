"""GET /v1/agents lists agents seen in the history and agents with an inbox on the broker (issue 18):
an agent that only opened its inbox is listed as open; after it closes it is not; a broker that does
not answer leaves the history's list, marked unavailable."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from squadbus.backends.memory import MemoryBackend
from squadbus.backends.nats import NatsBackend, NatsSettings
from squadbus.backends.redis import RedisBackend, RedisSettings
from squadbus.core.backend import Backend, GroupFigures
from squadbus.core.bus import Bus
from squadbus.core.inbox_source import InboxPresence
from squadbus.service.presence import inbox_groups
from squadbus.testing.servers.nats import NatsServer
from squadbus.testing.servers.redis import RedisServer
from tests.service.conftest import Api, MakeApp, asgi, message


async def agents(api: Api, **params: Any) -> dict[str, Any]:
    api.service.presence.max_age = 0.0  # read the broker on every request
    response = await api.client.get("/v1/agents", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def by_id(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["agent_id"]: a for a in body["items"]}


async def test_an_agent_with_only_an_open_inbox_is_listed_until_it_closes(make_app: MakeApp) -> None:
    async with Bus(MemoryBackend()) as bus, asgi(make_app(bus=bus, workers=())) as api:
        assert (await api.client.post("/v1/messages", json=message(sender="pm"))).status_code == 201
        quiet = await bus.inbox("quiet").open()
        talker = await bus.inbox("pm").open()
        body = await agents(api)
        assert body["inboxes"] == "open"
        listed = by_id(body)
        assert listed["quiet"] == {"agent_id": "quiet", "domain": None, "last_activity_at": None,
                                   "messages_sent": 0, "messages_received": 0, "inbox": "open",
                                   "inbox_holder": None, "inbox_since": None}
        assert listed["pm"]["inbox"] == "open" and listed["pm"]["messages_sent"] == 1
        assert listed["dev-1"]["inbox"] is None, "a recipient in the history whose inbox is not open"
        await quiet.close()
        await talker.close()
        listed = by_id(await agents(api))
        assert "quiet" not in listed, "no inbox and no message: not in the squad"
        assert listed["pm"]["inbox"] is None and listed["pm"]["messages_sent"] == 1


async def test_inbox_only_agents_land_once_on_the_page_their_id_falls_in(make_app: MakeApp) -> None:
    async with Bus(MemoryBackend()) as bus, asgi(make_app(bus=bus, workers=())) as api:
        for sender in ("b", "d"):  # in the history: b, d, and their recipient dev-1
            body = message(sender=sender, recipient_id="x-" + sender)
            assert (await api.client.post("/v1/messages", json=body)).status_code == 201
        for agent in ("a", "c", "e", "zz"):
            await bus.inbox(agent).open()
        pages: list[list[str]] = []
        cursor = None
        while True:
            params = {"limit": 1} if cursor is None else {"limit": 1, "cursor": cursor}
            body = await agents(api, **params)
            pages.append([a["agent_id"] for a in body["items"]])
            cursor = body["next_cursor"]
            if cursor is None:
                break
        flat = [a for page in pages for a in page]
        assert flat == sorted(["a", "b", "c", "d", "e", "x-b", "x-d", "zz"]), pages
        assert pages[0] == ["a", "b"]
        only = await agents(api, q="z")
        assert [a["agent_id"] for a in only["items"]] == ["zz"], "the prefix filters inbox agents too"


class HangingBackend(MemoryBackend):
    """A memory backend whose inbox listing never answers (a broker that hangs)."""

    async def open_inboxes(self) -> Sequence[InboxPresence]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_broker_that_does_not_answer_leaves_the_history_list(make_app: MakeApp) -> None:
    async with Bus(HangingBackend()) as bus, asgi(make_app(bus=bus, workers=())) as api:
        assert (await api.client.post("/v1/messages", json=message(sender="pm"))).status_code == 201
        api.service.presence.timeout = 0.2
        body = await agents(api)
        assert body["inboxes"] == "unavailable"
        assert set(by_id(body)) == {"pm", "dev-1"}
        assert all(a["inbox"] is None for a in body["items"])


def test_inbox_groups_name_their_agents() -> None:
    def group(name: str, subject: str) -> GroupFigures:
        return GroupFigures(group=name, subject=subject, lag=0, pending=0)

    figures = [group("inbox-dev-1", "agent.message.dev-1"),
               group("inbox-a_b", "agent.message.a:b"),  # the name read back from a broker-side name
               group("inbox-ops", "orders"),  # the topics it committed on (Kafka, no member here)
               group("db-writer", "agent.>")]
    assert [p.agent_id for p in inbox_groups(figures)] == ["dev-1", "a:b", "ops"]


# ---- real brokers: the inbox is opened by another backend instance (as by another process) ----------



@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    with NatsServer(tmp_path / "nats") as server:
        yield server


async def open_elsewhere(make_app: MakeApp, url: str, agent_backend: Backend) -> None:
    async with asgi(make_app(url=url, workers=())) as api, Bus(agent_backend) as elsewhere:
        inbox = await elsewhere.inbox("quiet-one").open()
        body = await agents(api)
        assert body["inboxes"] == "open"
        quiet = by_id(body)["quiet-one"]
        assert quiet["inbox"] == "open" and quiet["last_activity_at"] is None
        assert quiet["inbox_holder"], "the broker names the holder"
        await inbox.close()
        assert "quiet-one" not in by_id(await agents(api))


@pytest.mark.redis
async def test_redis_inbox_opened_in_another_process_is_listed(make_app: MakeApp, redis_server: RedisServer) -> None:
    url = f"{redis_server.url}?prefix=p{uuid.uuid4().hex[:8]}&block=0.5"
    await open_elsewhere(make_app, url, RedisBackend(RedisSettings.from_url(url)))


@pytest.mark.nats
async def test_nats_inbox_opened_in_another_process_is_listed(make_app: MakeApp, nats_server: NatsServer) -> None:
    await open_elsewhere(make_app, nats_server.url, NatsBackend(NatsSettings.from_url(nats_server.url)))
